"""Aggregate audio throughput of the Ray Serve deployment (cluster.py): 1 against 2 replicas, and 1 replica
behind Ray against the bare app.

Run:  .venv/bin/python bench/bench_cluster.py [--rounds 3] [--clients 4] [--requests 2] [--tokens 80]
          [--device cpu|cuda] [--model M --audio-tokenizer T] [--skip-bare]

A local Ray (loopback, no dashboard) runs two applications of ``cluster.deploy`` side by side, with the tiny
random-weight Higgs models of ``tests/tiny_models.py`` by default (or ``--model``/``--audio-tokenizer``,
e.g. the real ones on a GPU): **1 replica** under ``/one`` and **2 replicas** under ``/two``; and this
process serves the **bare app** (``create_app(settings)`` under uvicorn, ``_common.serve``) with the same
settings, torch limited to the threads one replica has. All three are up from the start and idle when not
measured; the load goes to one at a time, in rounds whose order rotates, and each figure is the median over
the rounds.

One load is ``--clients`` threads each sending ``--requests`` speech requests (pcm) in a row, every one
exactly ``--tokens`` decoding steps long (``speech_cap_settings``); the figure is seconds of audio received
per second of wall time over the whole load, and the replicas that answered (``X-Replica``) are counted.

* **2 replicas / 1 replica** shows how throughput scales. On the CPU each replica's torch uses one thread
  (Ray sets ``OMP_NUM_THREADS`` to a replica's one CPU), so two replicas need two idle cores to double it;
  on GPUs, each replica has its own GPU (``--device cuda`` with more than one).
* **1 replica behind Ray / bare app** is what Ray's HTTP proxy and routing cost (near 1.0x expected; a GPU
  gives the meaningful figure).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

from _common import (
    conditions,
    serve,
    service_settings,
    speech_cap_settings,
    spread,
    workspace,
    write_tiny_models,
)

TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."


@dataclass
class Load:
    """One load's result: audio seconds received, wall seconds, and the replicas that answered."""

    audio: float
    wall: float
    replicas: set[str]

    @property
    def rate(self) -> float:
        return self.audio / self.wall


def run_load(base_url: str, clients: int, requests: int, sample_rate: int = 24000) -> Load:
    """``clients`` threads, ``requests`` speech requests each; every answer is checked."""
    import httpx

    body = {"model": "tts-1", "input": TEXT, "voice": "default", "response_format": "pcm"}

    def client(index: int) -> tuple[float, set[str]]:
        audio, replicas = 0.0, set()
        with httpx.Client(base_url=base_url, timeout=600) as http:
            for n in range(requests):
                response = http.post("/v1/audio/speech", json={**body, "seed": index * 100 + n})
                response.raise_for_status()
                audio += len(response.content) / 2 / sample_rate
                replicas.add(response.headers.get("x-replica", "bare"))
        return audio, replicas

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    return Load(sum(a for a, _ in results), wall, set().union(*(r for _, r in results)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=80)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model")
    parser.add_argument("--audio-tokenizer")
    parser.add_argument("--skip-bare", action="store_true", help="only 1 against 2 replicas")
    args = parser.parse_args()

    load_before, started = os.getloadavg()[0], time.perf_counter()
    with workspace("higgs-bench-cluster-") as tmp, ExitStack() as stack:
        if args.model:
            models = {"HIGGS_MODEL": args.model, "HIGGS_AUDIO_TOKENIZER": args.audio_tokenizer}
        else:
            models = write_tiny_models(tmp)
        import ray
        from live_server import free_port
        from ray import serve as ray_serve

        import cluster

        settings = service_settings(
            models["HIGGS_MODEL"],
            models["HIGGS_AUDIO_TOKENIZER"],
            tmp / "voices",
            device=args.device,
            dtype="float32" if args.device == "cpu" else "auto",
            host="127.0.0.1",
            port=free_port(),
            **speech_cap_settings(args.tokens),
        )
        ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
        stack.callback(shutil.rmtree, ray_dir, ignore_errors=True)
        env = cluster.runtime_env()
        env["env_vars"] = {k: v for k, v in os.environ.items() if k.startswith("HF_")}
        ray.init(
            num_cpus=max(3, os.cpu_count() or 3),
            include_dashboard=False,
            _temp_dir=ray_dir,
            _node_ip_address="127.0.0.1",
            runtime_env=env,
            logging_level="warning",
            log_to_driver=False,
        )
        stack.callback(ray.shutdown)
        stack.callback(ray_serve.shutdown)
        proxy = f"http://127.0.0.1:{settings.port}"
        contenders = {}
        for replicas, prefix in ((1, "/one"), (2, "/two")):
            update = {"replicas": replicas}
            cluster.deploy(settings.model_copy(update=update), name=f"bench{replicas}", route_prefix=prefix)
            contenders[f"{replicas} replica{'s' * (replicas > 1)}"] = proxy + prefix
        if not args.skip_bare:
            import torch

            from app import create_app

            if args.device == "cpu":
                torch.set_num_threads(1)  # as a replica with one CPU
            contenders["bare app"] = stack.enter_context(serve(create_app(settings)))

        loads: dict[str, list[Load]] = {name: [] for name in contenders}
        for url in contenders.values():
            run_load(url, 2, 1)  # every engine past its first requests
        names = list(contenders)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                loads[name].append(run_load(contenders[name], args.clients, args.requests))
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)

    print(
        f"\n{args.clients} clients x {args.requests} speech requests of {args.tokens} steps, {args.device}"
        f"{'' if args.model else ' (tiny models)'}; median of {args.rounds} interleaved rounds\n"
    )
    rate = {name: statistics.median(load.rate for load in runs) for name, runs in loads.items()}
    print(f"{'':14} {'audio s/s: median (min-max)':>30}  replicas answering")
    for name, runs in loads.items():
        answering = {len(load.replicas) for load in runs}
        print(f"{name:14} {spread([load.rate for load in runs], unit='', width=8):>30}  {sorted(answering)}")
    print(f"\n2 replicas / 1 replica: {rate['2 replicas'] / rate['1 replica']:.2f}x")
    if "bare app" in rate:
        print(f"1 replica behind Ray / bare app: {rate['1 replica'] / rate['bare app']:.2f}x")
    print(conditions(time.perf_counter() - started, load_before))


if __name__ == "__main__":
    main()
