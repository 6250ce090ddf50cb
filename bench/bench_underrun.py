"""More listeners than slots: the silences each listener hears when the codec cannot keep up.

Run:  .venv/bin/python bench/bench_underrun.py [--slots 4] [--listeners 6] [--max-tokens 100] [--rounds 4]

The service (``create_app``, speech recognition off) is served for real by uvicorn on 127.0.0.1, by default
over the tiny random-weight models of ``tests/tiny_models.py`` on the CPU in float32, where the audio codec
is most of a request's work. ``--listeners`` streamed chat requests (voice ``default``, ``--max-tokens``
steps each, their own seeds) are sent at once to ``--slots`` slots, so some of them join while the others
already decode. Each listener is taken to play its audio from its first piece on: a piece that arrives
after the audio before it has been played is a silence of that length.

Two contenders, in interleaved rounds (the order alternating) in one run, on the same server: the codec
taking the oldest due piece first (what the engine did before; ``AudioStream.runs_out`` made constant, so
the choice falls to the oldest), and the engine as it is, which takes the next piece of the listener who
runs out of audio first. The total silence is what the codec's speed leaves; the choice decides who hears
it. Reported per contender (median round, and the range over rounds): the longest single silence any
listener heard, the most silence one listener heard in all, and the total over listeners; then the ratios.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import threading
import time
from pathlib import Path

from _common import at_once, conditions, run_script, serve, service_settings, spread

TEXT = "More listeners than slots: each should hear its fair share of the silence, if any."


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slots", type=int, default=4, help="HIGGS_MAX_BATCH_SIZE")
    parser.add_argument("--listeners", type=int, default=6, help="streamed requests sent at once")
    parser.add_argument("--max-tokens", type=int, default=100, help="decoding steps per request")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per contender")
    run_script(parser, run)


def silences(arrivals: list[tuple[float, float]]) -> list[float]:
    """The silences of a listener playing from its first piece on: (arrival time, seconds of audio) pairs."""
    played_to, gaps = arrivals[0][0], []
    for arrived, seconds in arrivals:
        if arrived > played_to:
            gaps.append(arrived - played_to)
            played_to = arrived
        played_to += seconds
    return gaps


def run(args: argparse.Namespace, model: str, audio_tokenizer: str, voices_dir: Path) -> None:
    import httpx

    import audio_stream
    from app import create_app

    dtype = args.dtype if args.model is not None else ("float32" if args.dtype == "auto" else args.dtype)
    settings = service_settings(
        model, audio_tokenizer, voices_dir, device=args.device, dtype=dtype, max_batch_size=args.slots,
        max_queue=max(64, 2 * args.listeners), max_audio_seconds=600,
    )  # fmt: skip
    app = create_app(settings)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with serve(app, start_timeout=1800) as url, httpx.Client(base_url=url, timeout=1800) as client:
        rate = app.state.engine.sample_rate

        def listen(seed: int, gate: threading.Barrier) -> list[float]:
            body = {
                "model": settings.served_model_name, "modalities": ["text", "audio"],
                "audio": {"voice": "default", "format": "pcm16"},
                "messages": [{"role": "user", "content": TEXT}],
                "max_tokens": args.max_tokens, "seed": seed, "stream": True,
            }  # fmt: skip
            gate.wait()
            sent, arrivals = time.perf_counter(), []
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        audio = chunk["choices"][0]["delta"].get("audio") if chunk["choices"] else None
                        if audio and audio.get("data"):
                            seconds = len(base64.b64decode(audio["data"])) / 2 / rate
                            arrivals.append((time.perf_counter() - sent, seconds))
            return silences(arrivals)

        def round_of(seeds: list[int]) -> list[list[float]]:
            return at_once(listen, seeds)

        round_of([1])  # untimed: first-use costs
        neediest = audio_stream.AudioStream.runs_out
        contenders = {"oldest piece first": property(lambda stream: 0.0), "neediest listener first": neediest}
        got: dict[str, dict[str, list[float]]] = {
            name: {"longest": [], "one listener": [], "total": []} for name in contenders
        }
        try:
            for r in range(args.rounds):
                names = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
                for name in names:
                    audio_stream.AudioStream.runs_out = contenders[name]
                    heard = round_of([100 * r + i for i in range(args.listeners)])
                    got[name]["longest"].append(max((max(g) for g in heard if g), default=0.0))
                    got[name]["one listener"].append(max(sum(g) for g in heard))
                    got[name]["total"].append(sum(sum(g) for g in heard))
        finally:
            audio_stream.AudioStream.runs_out = neediest

    print(
        f"\nbench_underrun: {'tiny random-weight models' if args.model is None else args.model} on "
        f"{args.device}, {args.listeners} streams at once on {args.slots} slots, {args.max_tokens} steps "
        f"each, {args.rounds} rounds per contender, torch threads {args.threads}"
    )
    for name, values in got.items():
        print(f"{name}:")
        for what, seconds in values.items():
            print(f"  {what + ' silence:':28} {spread(seconds)}")
    old, new = got["oldest piece first"], got["neediest listener first"]
    for what in ("longest", "one listener", "total"):
        ratio = statistics.median(new[what]) / max(statistics.median(old[what]), 1e-9)
        print(f"neediest / oldest, {what} silence: {ratio:.2f}x")
    print(f"\nrun: {conditions(time.monotonic() - started, load_before)}")


if __name__ == "__main__":
    main()
