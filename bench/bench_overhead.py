"""Per-decoding-step cost of the service through HTTP against the bare upstream Higgs Audio engine.

Run:  .venv/bin/python bench/bench_overhead.py [--repeats 7] [--lengths 64 256] [--threads N]

Both contenders run in this one process, on the same tiny random-weight Higgs models
(``tests/tiny_models.py``, written to a temporary folder), on the CPU in float32 with the same number of
torch threads:

* **service**: ``create_app(settings)`` served for real by uvicorn on 127.0.0.1 (a free port, a background
  thread); the app's lifespan loads and warms up its own engine. Each request is an httpx POST to
  ``/v1/chat/completions`` with ``modalities: ["text", "audio"]``, ``audio: {voice: "alloy", format: "wav"}``,
  an explicit ``max_tokens`` and ``seed``; it is timed on the client from sending the request to having
  read the whole response.
* **upstream**: ``boson_multimodal``'s ``HiggsAudioServeEngine.generate`` called directly with a
  ``ChatMLSample`` holding the same system prompt (the service's default scene) and user text,
  ``force_audio_gen=True``, the same seed, ``max_new_tokens`` and sampling settings (the service's
  defaults: temperature, top-p, top-k, RAS window), and upstream's default stop strings.

The tiny model's audio stream never ends by itself, so both sides decode exactly ``max_new_tokens``
steps; this is checked (``usage.completion_tokens`` on the service, the audio columns upstream), as are
equal prompt lengths and sample-for-sample equal audio (same seed, same computation).

The contenders never run at once: requests are sequential, interleaved (service and upstream
alternate, in an order that flips every repeat) at two lengths. Fixed costs (HTTP, prompt building)
cancel in the slope ``(t_long - t_short) / (n_long - n_short)`` of the median times, which is reported as
the per-step time of each side, next to the plain per-request medians. Audio decoding (the codec) and
the service's WAV/base64/JSON encoding grow with the length, so they are part of the slope; the time
inside ``model.generate`` (the decoding loop itself) and inside the codec's ``decode`` are measured on
both sides as well, by wrapping those methods, and their slopes are printed as a breakdown.
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."
GOAL = 1.05


@dataclass
class Stopwatch:
    """Accumulates the wall time spent in the methods it wraps."""

    seconds: float = 0.0
    calls: int = 0

    def wrap(self, obj: Any, name: str) -> None:
        """Replace ``obj.name`` (an instance attribute from now on) by a timed version of itself."""
        inner = getattr(obj, name)

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        setattr(obj, name, timed)

    def take(self) -> float:
        """The seconds accumulated since the last ``take``; resets."""
        seconds, self.seconds, self.calls = self.seconds, 0.0, 0
        return seconds


@dataclass
class Side:
    """One contender: how to run a request of ``n`` steps, and its timings by length."""

    name: str
    run: Callable[[int], np.ndarray]
    loop: Stopwatch
    decode: Stopwatch
    total: dict[int, list[float]] = field(default_factory=dict)
    in_loop: dict[int, list[float]] = field(default_factory=dict)
    in_decode: dict[int, list[float]] = field(default_factory=dict)

    def timed(self, n: int) -> np.ndarray:
        """Run once, recording the wall time and the time inside the wrapped methods."""
        self.loop.take()
        self.decode.take()
        started = time.perf_counter()
        audio = self.run(n)
        self.total.setdefault(n, []).append(time.perf_counter() - started)
        self.in_loop.setdefault(n, []).append(self.loop.take())
        self.in_decode.setdefault(n, []).append(self.decode.take())
        return audio


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a background thread; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 600
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start (see its log above)")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def median(values: list[float]) -> float:
    return statistics.median(values)


def slope(times: dict[int, list[float]], short: int, long: int) -> float:
    """Seconds per step between the two lengths, from the median times."""
    return (median(times[long]) - median(times[short])) / (long - short)


def spread(values: list[float]) -> str:
    return f"{median(values):7.3f} s ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    """Run the benchmark and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed requests per side and length (median)")
    parser.add_argument("--lengths", type=int, nargs=2, default=[64, 256], metavar=("SHORT", "LONG"),
                        help="the two max_tokens values (decoding steps) the slope is taken between")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    short, long = sorted(args.lengths)
    if short == long or short < 1:
        parser.error("--lengths needs two different positive lengths")

    for key in [k for k in os.environ if k.startswith("HIGGS_")]:
        del os.environ[key]  # the settings below are the whole configuration
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    tiny_dir = Path(tempfile.mkdtemp(prefix="higgs-bench-"))
    try:
        from tiny_models import write_tiny_models  # sets HF_HUB_CACHE/OFFLINE before transformers loads

        tiny = write_tiny_models(tiny_dir)
        run(args.repeats, short, long, args.threads, args.seed, tiny)
    finally:
        shutil.rmtree(tiny_dir, ignore_errors=True)


def run(repeats: int, short: int, long: int, threads: int, seed: int, tiny: dict[str, str]) -> None:
    import httpx
    import soundfile as sf
    import torch
    from boson_multimodal.data_types import ChatMLSample, Message
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

    from app import create_app
    from engine import SYSTEM_TEMPLATE
    from settings import Settings

    torch.set_num_threads(threads)
    settings = Settings(model=tiny["HIGGS_MODEL"], audio_tokenizer=tiny["HIGGS_AUDIO_TOKENIZER"], device="cpu",
                        dtype="float32", stt_model="")

    upstream = HiggsAudioServeEngine(settings.model, settings.audio_tokenizer, device="cpu",
                                     torch_dtype=torch.float32, kv_cache_lengths=settings.kv_cache_lengths)
    sample = ChatMLSample(messages=[
        Message(role="system", content=SYSTEM_TEMPLATE.format(scene=settings.default_scene)),
        Message(role="user", content=TEXT),
    ])
    upstream_prompt: list[int] = []

    def run_upstream(n: int) -> np.ndarray:
        response = upstream.generate(
            sample,
            max_new_tokens=n,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            force_audio_gen=True,
            ras_win_len=settings.ras_window,
            seed=seed,
        )
        assert response.generated_audio_tokens.shape[1] == n, response.generated_audio_tokens.shape
        upstream_prompt[:] = [response.usage["prompt_tokens"]]
        return np.round(np.clip(response.audio, -1.0, 1.0) * 32767.0).astype(np.int16)

    app = create_app(settings)
    with serve(app) as url, httpx.Client(base_url=url, timeout=600) as client:
        engine = app.state.engine  # the app's own engine, loaded and warmed up by its lifespan
        service_prompt: list[int] = []

        def run_service(n: int) -> np.ndarray:
            response = client.post("/v1/chat/completions", json={
                "model": settings.served_model_name,
                "modalities": ["text", "audio"],
                "audio": {"voice": "alloy", "format": "wav"},
                "messages": [{"role": "user", "content": TEXT}],
                "max_tokens": n,
                "seed": seed,
            })
            response.raise_for_status()
            body = response.json()
            assert body["usage"]["completion_tokens"] == n, body["usage"]
            service_prompt[:] = [body["usage"]["prompt_tokens"]]
            wav = base64.b64decode(body["choices"][0]["message"]["audio"]["data"])
            return sf.read(io.BytesIO(wav), dtype="int16")[0]

        sides = [
            Side("service (HTTP)", run_service, Stopwatch(), Stopwatch()),
            Side("upstream engine", run_upstream, Stopwatch(), Stopwatch()),
        ]
        for side, model, codec in ((sides[0], engine._model, engine._codec),
                                   (sides[1], upstream.model, upstream.audio_tokenizer)):
            side.loop.wrap(model, "generate")
            side.decode.wrap(codec, "decode")
        worker_threads = engine._worker.submit(torch.get_num_threads).result()
        if worker_threads != torch.get_num_threads():
            raise RuntimeError(f"torch threads differ: service worker {worker_threads}, "
                               f"upstream {torch.get_num_threads()}")

        # One untimed run per side and length: warms both up and checks that they do the same work.
        same_audio = True
        for n in (short, long):
            service_audio, upstream_audio = run_service(n), run_upstream(n)
            same_audio &= service_audio.shape == upstream_audio.shape and bool(
                np.abs(service_audio.astype(np.int32) - upstream_audio).max() <= 1)
        if service_prompt != upstream_prompt:
            raise RuntimeError(f"prompt tokens differ: service {service_prompt}, upstream {upstream_prompt}")

        started = time.perf_counter()
        for rep in range(repeats):
            for n in (short, long):
                for side in sides if rep % 2 == 0 else sides[::-1]:
                    side.timed(n)
        elapsed = time.perf_counter() - started

    service, bare = sides
    print(f"tiny Higgs models (random weights), cpu float32; torch threads: service worker {worker_threads}, "
          f"upstream {torch.get_num_threads()}")
    print(f"text: {len(TEXT)} characters; prompt tokens: service {service_prompt[0]}, upstream "
          f"{upstream_prompt[0]}; seed {seed}")
    print(f"decoding steps checked: exactly {short} and {long} on both sides; same audio on both sides "
          f"(int16, within 1 LSB): {'yes' if same_audio else 'NO'}")
    print(f"{repeats} interleaved repeats per side and length ({elapsed:.0f} s); medians (min-max)")
    print()
    width = 36
    print(f"{'per request':<{width}} {'max_tokens=' + str(short):>26} {'max_tokens=' + str(long):>26}")
    for label, attr in (("", "total"), ("  in model.generate", "in_loop"), ("  in codec decode", "in_decode")):
        for side in sides:
            times = getattr(side, attr)
            print(f"{(side.name + label):<{width}} {spread(times[short]):>26} {spread(times[long]):>26}")
    print()
    print(f"per step, slope {short} -> {long} steps of the medians:")
    rows = (("whole request", "total"), ("in model.generate (decoding loop)", "in_loop"),
            ("in codec decode", "in_decode"))
    for label, attr in rows:
        s, u = slope(getattr(service, attr), short, long), slope(getattr(bare, attr), short, long)
        print(f"  {label:<{width - 2}} service {s * 1e3:7.3f} ms   upstream {u * 1e3:7.3f} ms   "
              f"ratio {s / u:5.3f}x")
    s_other = slope(service.total, short, long) - slope(service.in_loop, short, long) - slope(
        service.in_decode, short, long)
    u_other = slope(bare.total, short, long) - slope(bare.in_loop, short, long) - slope(
        bare.in_decode, short, long)
    print(f"  {'everything else':<{width - 2}} service {s_other * 1e3:7.3f} ms   upstream {u_other * 1e3:7.3f} ms")
    print()
    for n in (short, long):
        print(f"ratio service/upstream per request at {n} steps: "
              f"{median(service.total[n]) / median(bare.total[n]):5.3f}x")
    ratio = slope(service.total, short, long) / slope(bare.total, short, long)
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(f"ratio service/upstream per step: {ratio:5.3f}x (goal <= {GOAL:.2f}x: {verdict})")


if __name__ == "__main__":
    main()
