"""The host's ceiling: the audio seconds per second the service's Python side can carry when the GPU is not
the limit, measured against a simulated GPU of given speed.

Run:  .venv/bin/python bench/bench_host.py [--listeners 16] [--step-ms 3] [--codec-ms 5] [--seconds 10]

On a GPU the decoding step, the codec and the prefill run on the device, and everything else on the host's
Python threads: HTTP and encoding on the event loop, launching steps and streaming their tokens on the
scheduler thread, cutting and joining pieces on the codec thread, all under one interpreter lock. Whether
that host side can feed the issue's target (150 audio seconds per second at 16 listeners) does not need a
GPU to find out. This serves the real app (uvicorn on 127.0.0.1, the tiny models on the CPU) with its
device work replaced by waits that hold no lock, as a GPU's do:

* a decoding step is a wait of ``--step-ms`` from when the GPU is free (steps queue as a CUDA stream's
  would, launched ahead with the engine's CUDA lookahead) and gives a column of codes for every row;
* a codec call is a wait of ``--codec-ms`` (whatever its batch, as measured on an H200 for a 20-frame piece
  at batch 1 and 8) and gives silence of the right length; the codec batches any number of pieces, as
  CUDA graphs let it;
* prefills are real (the tiny model's, milliseconds) plus ``--prefill-ms`` a pass; a turn's newcomers are
  prefilled in one pass on the prefill thread while the running streams step on, as on CUDA.

The clients run in a separate process (as real clients would), each streaming ``/v1/audio/speech`` as raw PCM
(``--seconds`` of audio each). Printed, for 1 and for ``--listeners`` at once (each client sending
``--rounds`` requests one after another: a closed loop, as ``bench/load.py``'s clients are): audio seconds per
second of all streams together (over the whole run, and while every client was sending: until the first one
had no request left, as the end of a closed loop has fewer), first audio (median and 95th percentile), each
stream's real-time factor (its time from sending to its last byte over its audio's length), the rows a step
held on average, the ceiling the simulated GPU allows (rows / (step x 25 frames a second)) with the ratio to
it; then the engine's host time per step: ``launch`` and ``tokens`` (the host's work) against ``wait`` (the
host idle for the simulated GPU), and the simulated GPU's idle time between two steps in a row (``/metrics``'
``higgs_step_gpu_seconds_total{work="between"}``, from the simulated timing events). A ``wait`` near zero, or
an idle GPU, means the host is the limit. Then the codec: its calls for later pieces, the pieces a call took
on average, the share of the wall time it was busy (on a GPU, time it shares with the steps), and the longest
a listener playing from its first audio on would have heard silence (``stall``). And where a request's time
went on average: outside the engine (HTTP both ways, its prompt built), waiting in the line for a slot, its
fill (from its slot to its first token: its prefill and any fill before it), decoding (its first token to its
last) and its last audio (the codec's tail; the engine's results, as ``higgs_generation_phase_seconds`` has
them): in a closed loop, all but decoding leave a slot empty.

With the random-weight models every request runs to its cap, so requests of one text all end at the same
step, and in a closed loop their clients send again together: each round's newcomers wait for one another's
last audio, prompts and fills while the slots stand empty. Real requests differ in length with their texts.
``--spread F`` draws each request's length between (1 - F) and (1 + F) times ``--seconds`` by its text's
length (the same draws every run); ``--compare-spread`` runs every request as long and lengths spread by F
(0.3 unless given) side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path

from _common import (
    FRAME_RATE,
    conditions,
    run_script,
    serve,
    service_settings,
    speech_cap_settings,
    text_of_length,
)

TEXT = "Many listeners, one model: every stream should start soon and keep up."


def _ends_as_any_other(pending: list) -> list:
    """The codec's order before finished streams went first: by the listener who runs out first, and
    each stream's end in a call of its own."""
    from audio_stream import End, next_codec_work

    work = next_codec_work(pending, None, ends_first=None)
    return work if not isinstance(work[0], End) else work[:1]


def _as_it_is(pending: list) -> list:
    """The codec's order (on CUDA: no cap on a batch's frames)."""
    from audio_stream import next_codec_work

    return next_codec_work(pending, None)


ORDERS = {"ends as any other item": _ends_as_any_other, "ends first and together": _as_it_is}


AHEAD = {"one step ahead": 1, "two steps ahead": 2}

SECONDS_PER_CHARACTER = 0.1
"""With ``--spread``, the speech endpoint's cap follows each text's length (4 s plus this per character,
``planner.py``), so that a request's length is its text's, as with real weights."""


def _lengths(spread: float) -> dict[str, float]:
    """``--compare-spread``'s two ways: every request as long, and lengths spread by ``spread``."""
    return {"every request as long": 0.0, f"lengths spread +-{spread:.0%}": spread}


def _text(seconds: float) -> str:
    """A text whose speech the endpoint caps at ``seconds`` (at ``SECONDS_PER_CHARACTER``; 4 s at least)."""
    return text_of_length(TEXT, round((seconds - 4.0) / SECONDS_PER_CHARACTER))


def _bursts_of_python(ms: float, stop) -> None:
    """Plain Python for ``ms``, then a sleep as long, until ``stop`` (it holds the interpreter lock while it
    runs, up to Python's switch interval at a time)."""
    while not stop.is_set():
        until = time.perf_counter() + ms / 1e3
        while time.perf_counter() < until:
            sum(range(200))
        stop.wait(ms / 1e3)


def _gathers() -> dict[str, float]:
    from audio_stream import GATHER

    return {"pieces as they come": 0.0, f"pieces gathered ({GATHER * 1e3:.0f} ms)": GATHER}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listeners", type=int, default=16, help="streamed requests sent at once")
    parser.add_argument("--step-ms", type=float, default=3.0, help="simulated decoding step, any rows")
    parser.add_argument("--codec-ms", type=float, default=5.0, help="simulated codec call, any batch")
    parser.add_argument("--prefill-ms", type=float, default=0.0, help="added to each (real) prefill pass")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per request")
    parser.add_argument(
        "--rounds", type=int, default=1, help="requests each client sends one after another (a closed loop)"
    )
    parser.add_argument(
        "--python-beside",
        type=float,
        default=0.0,
        metavar="MS",
        help="a thread in the server running plain Python in bursts of MS ms, MS ms apart (as an event loop "
        "under load holds the interpreter lock)",
    )
    parser.add_argument(
        "--compare-ahead",
        action="store_true",
        help="steps launched one and two ahead (HIGGS_LOOKAHEAD_STEPS), alternated twice, at --listeners",
    )
    parser.add_argument(
        "--compare-gather",
        action="store_true",
        help="later pieces taken as they come or gathered for up to GATHER (CUDA's default), alternated "
        "twice, at --listeners",
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=0.0,
        metavar="F",
        help="each request's audio drawn between (1-F) and (1+F) times --seconds (by its text's length; the "
        "same draws every run), not all as long: clients that end together send together again",
    )
    parser.add_argument(
        "--compare-spread",
        action="store_true",
        help="every request as long, and lengths spread by --spread (0.3 unless given), alternated twice, "
        "at --listeners",
    )
    parser.add_argument(
        "--compare-ends",
        action="store_true",
        help="the codec's order for finished streams both ways (ends first and together, or as any other "
        "item), alternated twice, at --listeners",
    )
    run_script(parser, run)


def _clients(url: str, n: int, seconds: float, rounds: int, out, spread: float | None = None) -> None:
    """In the clients' process: ``n`` clients at once, each sending ``rounds`` streamed speech requests one
    after another (the next when the previous answer's last byte is in); per request (first audio and
    latency from its sending, end from the start, audio seconds). With ``spread`` (not None) each request's
    text makes its length (``_text``): ``seconds`` times a factor drawn between 1 - spread and 1 + spread
    from the client's and the round's number."""
    import random

    import httpx

    def text(client: int, round_: int) -> str:
        if spread is None:
            return TEXT
        draw = random.Random(1000 * client + round_).uniform(-1.0, 1.0)
        return _text(seconds * (1.0 + spread * draw))

    arrivals: list[tuple[float, int]] = []  # (seconds since the start, bytes) of every piece of audio

    async def one(client: httpx.AsyncClient, start: float, words: str) -> tuple[float, ...]:
        body = {"model": "tts-1", "input": words, "voice": "default", "response_format": "pcm", "speed": 1.0}
        first, received, sent, stall = None, 0, time.perf_counter(), 0.0
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            response.raise_for_status()
            async for chunk in response.aiter_bytes():
                now = time.perf_counter()
                if first is None and chunk:
                    first = now - sent
                elif chunk:  # a listener playing from its first audio on has heard all it got by then
                    stall = max(stall, now - sent - first - received / 2 / 24000)
                received += len(chunk)
                arrivals.append((now - start, len(chunk)))
        done = time.perf_counter()
        return first, done - start, received / 2 / 24000, done - sent, stall

    async def client_rounds(client: httpx.AsyncClient, start: float, number: int) -> list:
        return [await one(client, start, text(number, r)) for r in range(rounds)]

    async def all_at_once() -> tuple[list[tuple[float, ...]], float]:
        limits = httpx.Limits(max_connections=n + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            start = time.perf_counter()
            results = await asyncio.gather(*(client_rounds(client, start, i) for i in range(n)))
        # While every client was sending: until the first one had no request left (the run's end has fewer).
        until = min(rs[-1][1] for rs in results)
        heard = sum(size for at, size in arrivals if at <= until) / 2 / 24000
        return [r for rs in results for r in rs], heard / until

    try:
        out.put(asyncio.run(all_at_once()))
    except Exception as exc:  # the parent waits on ``out``: tell it
        out.put(repr(exc))


def _simulate_gpu(engine, step_ms: float, codec_ms: float, prefill_ms: float) -> None:
    """Replace the engine's device work by lock-free waits of the given lengths (see the module's text)."""
    import numpy as np
    import torch

    from audio_stream import GATHER, next_codec_work
    from decoder import Launched

    decoder = engine._decoder
    codes = torch.full((decoder.slots, 1 + engine.num_codebooks), 7, dtype=torch.long)
    codes[:, 0] = engine.higgs.config.audio_out_token_idx
    gpu_free = [0.0]

    class Event:
        """A simulated CUDA timing event: reached at ``at`` (``time.perf_counter``'s clock)."""

        def __init__(self, at: float):
            self.at = at

        def synchronize(self) -> None:
            time.sleep(max(0.0, self.at - time.perf_counter()))

        def elapsed_time(self, later: Event) -> float:
            return (later.at - self.at) * 1e3

    def launch() -> Launched:
        rows, _ = decoder._shape()
        for slot in decoder.busy:
            decoder.lengths[slot] += 1
        begun = max(time.perf_counter(), gpu_free[0])
        gpu_free[0] = begun + step_ms / 1e3
        return Launched(codes[:rows], Event(gpu_free[0]), Event(begun))

    def decode(batch: torch.Tensor, start: int, stop: int) -> np.ndarray:
        time.sleep(codec_ms / 1e3)
        return np.zeros((batch.shape[0], 1, stop - start), np.float32)

    def with_delay(prefill):
        def delayed(*args, **kwargs):
            time.sleep(prefill_ms / 1e3)
            return prefill(*args, **kwargs)

        return delayed

    decoder.launch = launch
    decoder.fill = with_delay(decoder.fill)
    engine._pieces.decode_part = decode
    engine._next_codec_work = lambda pending: next_codec_work(
        pending, None, gather=engine.codec_gather, max_batch=engine._codec_batch
    )  # as on CUDA, where a graph replays any batch up to the slots
    engine._codec_batch = engine.slots
    engine.codec_gather = GATHER
    engine._layout = replace(engine._layout, end_frames=engine.streaming.piece_frames)  # as on CUDA
    engine.lookahead = True
    engine.lookahead_steps = 2  # (CUDA's default)
    engine.prefill_beside_steps = True
    engine.prefill_in_one_pass = True
    engine.yield_to_first_pieces = False
    engine.first_piece_wait = 0


def run(args: argparse.Namespace, model: str, audio_tokenizer: str, voices_dir: Path) -> None:
    from app import create_app

    steps = int(args.seconds * FRAME_RATE)
    if args.compare_spread and not args.spread:
        args.spread = 0.3
    by_text = bool(args.spread)  # each request's cap made by its text (``_text``), not one for all
    if by_text and not (0 < args.spread < 1 and args.seconds * (1 - args.spread) > 4.0):
        raise SystemExit("--spread takes a fraction below 1 that leaves every request over 4 s of audio")
    cap = speech_cap_settings(steps)
    if by_text:
        cap = {"seconds_per_character": SECONDS_PER_CHARACTER, "max_audio_seconds": 1 + args.seconds * 2}
    settings = service_settings(
        model,
        audio_tokenizer,
        voices_dir,
        max_batch_size=args.listeners,
        max_queue=4 * args.listeners,
        kv_cache_lengths=[1024],
        **cap,
    )
    app = create_app(settings)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with serve(app, start_timeout=1800) as url:
        engine = app.state.engine
        _simulate_gpu(engine, args.step_ms, args.codec_ms, args.prefill_ms)
        context = multiprocessing.get_context("spawn")
        print(
            f"simulated GPU: a step {args.step_ms} ms, a codec call {args.codec_ms} ms, prefill + "
            f"{args.prefill_ms} ms; {steps} steps ({args.seconds} s of audio) per request"
            + (
                f" on average (+9 for the cap's margin), spread +-{args.spread:.0%} by the texts' lengths"
                if by_text
                else ""
            )
        )
        print(
            f"{'at once':>8} {'audio s/s':>10} {'sending':>8} {'ceiling':>8} {'ratio':>6} {'first p50':>10} "
            f"{'first p95':>10} {'RTF p50':>8} {'RTF max':>8} {'rows':>5}   host per step: launch / tokens / "
            "wait; the GPU idle between steps (ms) | codec: later-piece calls, pieces a call, busy share "
            "(calls of ends alone); stall max (s)"
        )
        runs = [(n, "") for n in sorted({1, args.listeners})]
        compared = _gathers() if args.compare_gather else AHEAD if args.compare_ahead else ORDERS
        if args.compare_spread:
            compared = _lengths(args.spread)
        comparing = args.compare_ends or args.compare_gather or args.compare_ahead or args.compare_spread
        if comparing:  # two ways, alternated
            runs = [(args.listeners, label) for _ in range(2) for label in compared]
        if args.python_beside:
            stop = threading.Event()
            threading.Thread(target=_bursts_of_python, args=(args.python_beside, stop), daemon=True).start()
            print(f"beside the loop: plain Python in bursts of {args.python_beside} ms, as far apart")
        got: dict[str, list[tuple[float, float]]] = {label: [] for label in compared}
        for n, label in runs:
            spread = args.spread if by_text else None
            if args.compare_spread:
                spread = compared[label]
            elif label in ORDERS:  # (the order takes pieces as they come: the codec thread waits for none)
                engine._next_codec_work = ORDERS[label]
                engine.codec_gather = 0.0
            elif label in AHEAD:
                engine.lookahead_steps = AHEAD[label]
            elif label:
                engine.codec_gather = compared[label]
            if label:
                print(label)
            out = context.Queue()
            results_seen: list = []
            engine.observers.append(results_seen.append)
            before, steps_before = engine.work(), engine.steps
            clients = context.Process(target=_clients, args=(url, n, args.seconds, args.rounds, out, spread))
            clients.start()
            got_back = out.get()
            clients.join()
            if isinstance(got_back, str):
                raise RuntimeError(f"the clients failed: {got_back}")
            results, sending = got_back
            after = engine.work()
            firsts = sorted(r[0] for r in results)
            wall = max(r[1] for r in results)
            audio = sum(r[2] for r in results)
            rtf = sorted(r[3] / r[2] for r in results)
            rows = (engine.steps - steps_before) / max(after.steps - before.steps, 1)
            ceiling = min(n, engine.slots) / (args.step_ms / 1e3 * FRAME_RATE)
            done = max(after.steps - before.steps, 1)
            per = {k: (after.scheduler[k] - before.scheduler[k]) / done * 1e3 for k in after.scheduler}
            idle = (after.step_gpu["between"] - before.step_gpu["between"]) / done * 1e3
            p95 = firsts[min(len(firsts) - 1, int(round(0.95 * (len(firsts) - 1))))]
            calls = after.codec_calls["piece"] - before.codec_calls["piece"]
            pieces = after.codec_pieces - before.codec_pieces - len(results)  # less each one's first piece
            busy = sum(after.codec.values()) - sum(before.codec.values())
            ends = after.codec_calls["end"] - before.codec_calls["end"]
            print(
                f"{n:>8} {audio / wall:>10.1f} {sending:>8.1f} {ceiling:>8.1f} "
                f"{audio / wall / ceiling:>6.2f} "
                f"{statistics.median(firsts):>9.3f}s {p95:>9.3f}s {statistics.median(rtf):>8.3f} "
                f"{rtf[-1]:>8.3f} {rows:>5.1f}   "
                f"{per['launch']:.3f} / {per['tokens']:.3f} / {per['wait']:.3f}; {idle:.3f} | "
                f"{calls} {pieces / max(calls, 1):.1f} {busy / wall:.2f} ({ends}); "
                f"{max(r[4] for r in results):.3f}"
            )
            engine.observers.remove(results_seen.append)
            mean = {
                "outside the engine": statistics.mean(r[3] for r in results)
                - statistics.mean(r.seconds + r.queue_seconds for r in results_seen),
                "in the line": statistics.mean(r.queue_seconds for r in results_seen),
                "its fill": statistics.mean(r.fill_seconds for r in results_seen),
                "decoding": statistics.mean(r.decode_seconds for r in results_seen),
                "its last audio": statistics.mean(
                    r.seconds - r.fill_seconds - r.decode_seconds for r in results_seen
                ),
            }
            print(f"{'':>8} a request (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in mean.items()))
            if label:
                got[label].append((audio / wall, sending))
        if args.python_beside:
            stop.set()
        if comparing:
            (old, old_sending), (new, new_sending) = (
                [statistics.mean(column) for column in zip(*got[label], strict=True)] for label in compared
            )
            print(
                f"audio s per s, {' / '.join(reversed(compared))}: {new / old:.2f}x over the whole run, "
                f"{new_sending / old_sending:.2f}x while every client was sending"
            )
    print(conditions(time.monotonic() - started, load_before))


if __name__ == "__main__":
    main()
