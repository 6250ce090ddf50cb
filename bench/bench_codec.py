"""The audio codec's decode as upstream loads it, against the engine's preparation of it, side by side.

Run:  .venv/bin/python bench/bench_codec.py [--rounds 7] [--calls 10] [--frames 8 20] [--batch 1]
      .venv/bin/python bench/bench_codec.py --model bosonai/higgs-audio-v2-generation-3B-base \\
          --audio-tokenizer bosonai/higgs-audio-v2-tokenizer --device cuda

Three copies of the codec, each loaded by upstream's ``load_higgs_audio_tokenizer``: as loaded; with its
weight normalisation folded into plain weights (``codec.bake_weight_norm``); and that with its Snake
activations in place as well (``codec.snakes_in_place``: what the engine serves). Each decodes the same
pieces with the codec's own ``decode``, by default of the streamed lengths (a first piece of 8 frames, a
later one of 20), ``--calls`` calls per timing, and each encodes a clip of ``--encode-seconds`` (a voice
reference's work); the copies take turns in ``--rounds`` rounds, the order rotating, so drift in the
machine's load hits all three. Printed: the median milliseconds per call, each copy's time as a multiple of
upstream's, and whether its samples (codes, for the clip) equal upstream's (they must). By default
on the tiny codec of ``tests/tiny_models.py`` on the CPU, whose decoder has the real one's 1,024 channels
at the frame rate and four upsampling stages; ``--audio-tokenizer`` (with ``--model``, which is not loaded)
measures another.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _common import conditions, run_script, spread

CODEBOOK_SIZE = 1024  # Higgs Audio v2's codebooks (the tiny codec's too)
COPIES = ("upstream", "weight norm folded", "folded, snakes in place")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 20], help="piece lengths, in frames")
    parser.add_argument("--batch", type=int, default=1, help="pieces per call")
    parser.add_argument("--calls", type=int, default=10, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=7, help="timings per copy and length")
    parser.add_argument("--encode-seconds", type=float, default=4.0, help="the clip to encode (0: none)")
    run_script(parser, run)


def run(args: argparse.Namespace, model: str, audio_tokenizer: str, voices_dir: Path) -> None:
    import numpy as np
    import torch
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import load_higgs_audio_tokenizer

    from codec import bake_weight_norm, snakes_in_place

    device = "cuda:0" if args.device == "cuda" else "cpu"
    codecs = {}
    for name in COPIES:
        codec = load_higgs_audio_tokenizer(audio_tokenizer, device=device)
        if name != "upstream":
            bake_weight_norm(codec)
        if name == "folded, snakes in place":
            snakes_in_place(codec)
        codecs[name] = codec
    codebooks = codecs["upstream"].num_codebooks
    generator = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    rows = []
    with torch.inference_mode():
        for frames in args.frames:
            codes = torch.randint(0, CODEBOOK_SIZE, (args.batch, codebooks, frames), generator=generator)
            same = {
                name: bool(np.array_equal(codec.decode(codes), codecs["upstream"].decode(codes)))
                for name, codec in codecs.items()
            }  # also the warm-up of each copy for this shape
            times: dict[str, list[float]] = {name: [] for name in COPIES}
            for r in range(args.rounds):
                order = COPIES[r % len(COPIES) :] + COPIES[: r % len(COPIES)]
                for name in order:
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        codecs[name].decode(codes)
                    times[name].append((time.perf_counter() - t0) / args.calls * 1000)
            rows.append((str(frames), times, same))
        if args.encode_seconds > 0:
            rate = codecs["upstream"].sample_rate
            t = np.arange(int(rate * args.encode_seconds), dtype=np.float32) / rate
            noise = np.random.default_rng(0).standard_normal(t.size)
            clip = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * noise).astype(np.float32)
            codes = codecs["upstream"].encode(clip, rate)
            same = {name: bool(torch.equal(c.encode(clip, rate), codes)) for name, c in codecs.items()}
            times = {name: [] for name in COPIES}
            for r in range(args.rounds):
                for name in COPIES[r % len(COPIES) :] + COPIES[: r % len(COPIES)]:
                    t0 = time.perf_counter()
                    codecs[name].encode(clip, rate)
                    times[name].append((time.perf_counter() - t0) * 1000)
            rows.append((f"{args.encode_seconds:g} s clip", times, same))

    print(
        f"\nbench_codec: {'the tiny codec' if args.model is None else audio_tokenizer} on {args.device}, "
        f"{args.batch} piece(s) a call, {args.calls} calls a timing, {args.rounds} rounds, "
        f"torch threads {args.threads}"
    )
    print("   piece  copy                      ms per call, median (min-max)   vs upstream   same output")
    for piece, times, same in rows:
        upstream = statistics.median(times["upstream"])
        for name in COPIES:
            ratio = statistics.median(times[name]) / upstream
            column = spread(times[name], unit=" ms", width=8)
            print(f"{piece:>8}  {name:24}  {column:32}  {ratio:10.2f}x   {same[name]}")
    print(f"\nrun: {conditions(time.monotonic() - started, load_before)}")


if __name__ == "__main__":
    main()
