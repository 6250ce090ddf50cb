"""Continuous batching: first audio and total audio per second with many listeners, against one at a time.

Run:  .venv/bin/python bench/bench_batching.py [--max-tokens 100] [--repeats 3] [--threads N]
      .venv/bin/python bench/bench_batching.py --model bosonai/higgs-audio-v2-generation-3B-base \\
          --audio-tokenizer bosonai/higgs-audio-v2-tokenizer --device cuda --max-tokens 400 \\
          --slots 16 --listeners 16 --concurrency 1 4 16

The service (``create_app``, speech recognition off) is served for real by uvicorn on 127.0.0.1 in a
background thread, by default over the tiny random-weight models of ``tests/tiny_models.py`` on the CPU in
float32 (absolute times then mean nothing; the ratios do). Every request is a chat completion for audio
with voice ``default``, its own seed and ``max_tokens`` (the tiny model's audio never ends by itself, so each
request decodes exactly that many steps). Two measurements, side by side in one run:

* **first audio**: one streamed request alone (median of ``--repeats``), then ``--listeners`` streamed
  requests sent at once (``--repeats`` rounds, the median round reported): the slowest of them to hear its
  first audio piece, as a multiple of the alone time (the issue's target: at most 3x); and the codec's time
  on first pieces in both cases (on the CPU up to 4 first pieces share a codec call, so the last listener
  waits for the calls before its own), and the engine's work in the median round, the streams to their end
  (``engine.work()``: prefill, steps, pauses, the codec's calls by kind). On the CPU, where the decoding
  loop pauses while a first piece is due, the same again with the loop decoding on beside the codec, the
  rounds of the two interleaved;
* **throughput**: for each concurrency ``c``, ``c`` whole (non-streamed) requests sent at once, against the
  same ``c`` requests sent one after another, in ``--rounds`` interleaved rounds: seconds of audio produced
  per wall-clock second, and the ratio (batched / one at a time; it should never be below 1).

The clients run in a process of their own, as real clients do: a thread of each request, in the server's
own process, would take the server's interpreter lock for its Python (reading the stream line by line,
parsing its JSON), and more of it the more listeners there are. ``--clients-here`` runs them there, as
this script did before 2026-11-28, for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _common import (
    at_once,
    conditions,
    run_script,
    serve,
    service_settings,
    spread,
)

TEXT = "Many listeners, one model: every stream should start soon and keep up."


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=100, help="decoding steps per request")
    parser.add_argument("--repeats", type=int, default=3, help="first-audio runs alone and rounds at once")
    parser.add_argument("--listeners", type=int, default=8, help="streamed requests sent at once")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per concurrency")
    parser.add_argument("--slots", type=int, default=8, help="HIGGS_MAX_BATCH_SIZE")
    parser.add_argument(
        "--clients-here", action="store_true", help="the clients as threads of the server's own process"
    )
    run_script(parser, run)


_client = None  # the clients' httpx.Client, in whichever process sends the requests (``_connect``)


def _connect(url: str) -> None:
    global _client
    import httpx

    _client = httpx.Client(base_url=url, timeout=1800)


def _first_audio(body: dict, gate: threading.Barrier | None = None) -> float:
    """Seconds from sending a streamed request to its first audio piece (then read to the end)."""
    if gate is not None:
        gate.wait()
    sent = time.perf_counter()
    heard = None
    with _client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if heard is None and line.startswith("data: {") and '"data":"' in line:
                chunk = json.loads(line[6:])
                audio = chunk["choices"][0]["delta"].get("audio") if chunk["choices"] else None
                if audio and audio.get("data"):
                    heard = time.perf_counter() - sent
    if heard is None:
        raise RuntimeError("a stream ended without audio")
    return heard


def _whole(body: dict, gate: threading.Barrier | None = None) -> float:
    """Seconds of audio in one whole answer."""
    if gate is not None:
        gate.wait()
    response = _client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"] / 25.0


def _send(bodies: list[dict], together: bool) -> tuple[list[float], float]:
    """``bodies`` sent at once (each on a thread of its own, leaving together), or one after another;
    each one's first audio (streamed) or audio seconds (whole), and the wall time of them all."""
    fn = _first_audio if bodies[0]["stream"] else _whole
    started = time.perf_counter()
    if together and len(bodies) > 1:
        got = at_once(lambda i, gate: fn(bodies[i], gate), list(range(len(bodies))))
    else:
        got = [fn(body) for body in bodies]
    return got, time.perf_counter() - started


def work_done(before, after) -> str:
    """The engine's work between two ``engine.work()`` readings: the decoding loop's and the codec's."""
    spent = {k: after.scheduler[k] - before.scheduler[k] for k in after.scheduler}
    codec = {k: after.codec[k] - before.codec[k] for k in after.codec}
    calls = {k: after.codec_calls[k] - before.codec_calls[k] for k in after.codec_calls}
    pieces = ", ".join(f"{k} {calls[k]} in {codec[k]:.3f} s" for k in codec if calls[k])
    return (
        f"prefill {spent['prefill']:.3f} s ({after.prefills - before.prefills} passes), "
        f"{after.steps - before.steps} steps: launch {spent['launch']:.3f} s, wait {spent['wait']:.3f} s, "
        f"tokens {spent['tokens']:.3f} s; paused {spent['paused']:.3f} s; "
        f"codec: {pieces}"
    )


def run(args: argparse.Namespace, model: str, audio_tokenizer: str, voices_dir: Path) -> None:
    from app import create_app

    dtype = args.dtype if args.model is not None else ("float32" if args.dtype == "auto" else args.dtype)
    settings = service_settings(
        model,
        audio_tokenizer,
        voices_dir,
        device=args.device,
        dtype=dtype,
        max_batch_size=args.slots,
        max_queue=max(64, 2 * args.listeners),
        max_audio_seconds=600,
    )

    def body(seed: int, stream: bool) -> dict:
        return {
            "model": settings.served_model_name, "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "pcm16" if stream else "wav"},
            "messages": [{"role": "user", "content": TEXT}], "max_tokens": args.max_tokens, "seed": seed,
            "stream": stream,
        }  # fmt: skip

    app = create_app(settings)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with serve(app, start_timeout=1800) as url, _clients(url, args.clients_here) as send:
        slots = app.state.engine.slots  # what the KV budget allowed

        def first_audio(seeds: list[int]) -> list[float]:
            return send([body(s, True) for s in seeds], True)[0]

        def whole(seeds: list[int], together: bool) -> tuple[float, float]:
            """The requests' seconds of audio and the wall time they took."""
            audio, wall = send([body(s, False) for s in seeds], together)
            return sum(audio), wall

        engine = app.state.engine
        first_frames = engine.streaming.first_piece_frames
        firsts: list[tuple[int, float]] = []  # (pieces, seconds) of each codec call on first pieces
        codec_decode = engine._pieces.decode_part

        def timed_decode(codes, *span):
            started = time.perf_counter()
            try:
                return codec_decode(codes, *span)
            finally:
                if codes.shape[-1] == first_frames:
                    firsts.append((codes.shape[0], time.perf_counter() - started))

        engine._pieces.decode_part = timed_decode
        whole([0], False)  # untimed: first-use costs

        # On a CPU the loop pauses while a first piece is due; measured against no pause, interleaved.
        pausing = [True, False] if engine.yield_to_first_pieces else [False]
        kept = ("alone", "alone_codec", "crowds", "crowd_codecs", "crowd_work")
        runs = {p: {k: [] for k in kept} for p in pausing}
        for r in range(args.repeats):
            for pause in pausing if r % 2 == 0 else pausing[::-1]:
                engine.yield_to_first_pieces = pause
                got = runs[pause]
                firsts.clear()
                got["alone"] += first_audio([100 + r])
                got["alone_codec"] += [seconds for _, seconds in firsts]
                firsts.clear()
                before = engine.work()
                got["crowds"].append(first_audio([200 + 100 * r + i for i in range(args.listeners)]))
                got["crowd_codecs"].append(list(firsts))
                got["crowd_work"].append(work_done(before, engine.work()))
        engine.yield_to_first_pieces = pausing[0]

        def one_at_a_time(seeds: list[int]) -> float:
            audio, wall = whole(seeds, False)
            return audio / wall

        def batched(seeds: list[int]) -> float:
            audio, wall = whole(seeds, True)
            return audio / wall

        rows = []
        for c in args.concurrency:
            seeds = [300 + c * 10 + i for i in range(c)]
            alone_rates, batch_rates, ratios = [], [], []
            for r in range(args.rounds):  # interleaved, the order alternating: drift hits both sides
                if r % 2:
                    b, a = batched(seeds), one_at_a_time(seeds)
                else:
                    a, b = one_at_a_time(seeds), batched(seeds)
                alone_rates.append(a)
                batch_rates.append(b)
                ratios.append(b / a)
            rows.append((c, alone_rates, batch_rates, ratios))

    print(
        f"\nbench_batching: {'tiny random-weight models' if args.model is None else args.model} on "
        f"{args.device}, {slots} slots, {args.max_tokens} steps per request, "
        f"torch threads {args.threads}; the clients "
        f"{'in the server' + chr(39) + 's process' if args.clients_here else 'in a process of their own'}"
    )
    for pause, got in runs.items():
        if len(runs) > 1:
            print("\nthe loop pausing while a first piece is due:" if pause else "\nthe loop decoding on:")
        slowest_of_each = [max(c) for c in got["crowds"]]
        middle = slowest_of_each.index(sorted(slowest_of_each)[args.repeats // 2])  # the median round
        crowd, crowd_codec = got["crowds"][middle], got["crowd_codecs"][middle]
        print(f"first audio, one stream alone:          {spread(got['alone'])}")
        rounds = f"rounds: {spread(slowest_of_each)}; that round's all: {spread(crowd)}"
        print(f"first audio, {args.listeners} streams at once (slowest): {max(crowd):7.3f} s  ({rounds})")
        ratio = max(crowd) / statistics.median(got["alone"])
        print(f"slowest of {args.listeners} / alone:                  {ratio:7.2f}x   (target: at most 3x)")
        pieces = sum(n for n, _ in crowd_codec)
        print(
            f"codec, first pieces ({first_frames} frames): alone {spread(got['alone_codec'])} each; "
            f"{args.listeners} at once {pieces} pieces in {len(crowd_codec)} calls, "
            f"{sum(s for _, s in crowd_codec):.3f} s in all"
        )
        print(f"that round's engine work, the streams to their end: {got['crowd_work'][middle]}")
    print(f"\naudio s/s, median of {args.rounds} interleaved rounds (min-max):")
    print("concurrency   one at a time             batched                   batched / one at a time")
    for c, alone_rates, batch_rates, ratios in rows:
        one = spread(alone_rates, unit="", width=6)
        together = spread(batch_rates, unit="", width=6)
        print(f"{c:11d}   {one:24}  {together:24}  {spread(ratios, unit='x', width=5)}")
    print(f"\nrun: {conditions(time.monotonic() - started, load_before)}")


@contextlib.contextmanager
def _clients(url: str, here: bool) -> Iterator[Callable[[list[dict], bool], tuple[list[float], float]]]:
    """``_send`` in a process of the clients' own (spawned, kept for the run), or in this one."""
    if here:
        _connect(url)
        try:
            yield _send
        finally:
            _client.close()
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_connect, initargs=(url,)) as pool:
        yield lambda bodies, together: pool.submit(_send, bodies, together).result()


if __name__ == "__main__":
    main()
