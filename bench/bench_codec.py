"""The audio codec's decode as upstream loads it, against the engine's preparation of it, side by side.

Run:  .venv/bin/python bench/bench_codec.py [--rounds 7] [--calls 10] [--frames 8 20] [--batch 1]
      .venv/bin/python bench/bench_codec.py --model bosonai/higgs-audio-v2-generation-3B-base \\
          --audio-tokenizer bosonai/higgs-audio-v2-tokenizer --device cuda

Three copies of the codec, each loaded by upstream's ``load_higgs_audio_tokenizer``: as loaded; with its
weight normalisation folded into plain weights (``codec.bake_weight_norm``); and that with its Snake
activations in place as well (``codec.snakes_in_place``). Each decodes the same pieces with the codec's
own ``decode``, by default of the streamed lengths (a first piece of 8 frames, a later one of 20),
``--calls`` calls per timing, and each encodes a clip of ``--encode-seconds`` (a voice reference's work).
A fourth row is what the engine serves: the third copy decoding only the samples a stream sends of such a
piece and the crossfade's tail (``codec.PieceDecoder.decode_part``: of a first piece its first 4 frames,
of a later one the 12 between its context frames), eagerly as on a CPU. The rows take turns in
``--rounds`` rounds, the order rotating, so drift in the machine's load hits all of them. Printed: the
median milliseconds per call, each row's time as a multiple of upstream's, and whether its samples
(codes, for the clip) equal upstream's (they must; for the fourth row, those samples of upstream's, up to
float rounding: within 1e-5 of the peak). By default
on the tiny codec of ``tests/tiny_models.py`` on the CPU, whose decoder has the real one's 1,024 channels
at the frame rate and four upsampling stages; ``--audio-tokenizer`` (with ``--model``, which is not loaded)
measures another.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

from _common import conditions, run_script, spread

CODEBOOK_SIZE = 1024  # Higgs Audio v2's codebooks (the tiny codec's too)
COPIES = ("upstream", "weight norm folded", "folded, snakes in place")
IN_PART = "the samples sent only"


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

    from audio_stream import Layout
    from codec import PieceDecoder, bake_weight_norm, snakes_in_place
    from generation import StreamSettings

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
    served = codecs["folded, snakes in place"]
    pieces = PieceDecoder(served, codebooks=codebooks, codebook_size=CODEBOOK_SIZE, graphs=False)
    rates = int(served.sample_rate), int(served.tps)
    layout = Layout(StreamSettings(), codebooks, CODEBOOK_SIZE, *rates)
    generator = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    rows = []
    decoders = {name: codec.decode for name, codec in codecs.items()}
    with torch.inference_mode():
        for frames in args.frames:
            start, stop = sent_span(frames, layout)
            decoders[IN_PART] = lambda codes, start=start, stop=stop: pieces.decode_part(codes, start, stop)
            codes = torch.randint(0, CODEBOOK_SIZE, (args.batch, codebooks, frames), generator=generator)
            upstream = codecs["upstream"].decode(codes)
            same = {name: bool(np.array_equal(c.decode(codes), upstream)) for name, c in codecs.items()}
            in_part = pieces.decode_part(codes, start, stop)  # (the warm-ups of every row for this shape)
            peak = np.abs(upstream).max()
            same[IN_PART] = bool(np.abs(in_part - upstream[..., start:stop]).max() <= 1e-5 * peak)
            names = (*COPIES, IN_PART)
            times: dict[str, list[float]] = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        decoders[name](codes)
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
        for name in times:
            ratio = statistics.median(times[name]) / upstream
            column = spread(times[name], unit=" ms", width=8)
            print(f"{piece:>8}  {name:24}  {column:32}  {ratio:10.2f}x   {same[name]}")
    print(f"\nrun: {conditions(time.monotonic() - started, load_before)}")


def sent_span(frames: int, layout) -> tuple[int, int]:
    """The samples a stream sends of a piece of ``frames`` frames, and the crossfade's tail: read off an
    ``AudioStream`` (``cut``, ``span``) fed columns until it cuts a piece that long, its first piece or a
    later one (the stream's chunk set to make later pieces that long)."""
    import numpy as np

    from audio_stream import AudioStream

    settings = layout.settings
    if frames != settings.first_piece_frames:
        chunk = frames - 2 * settings.context_frames
        layout = dataclasses.replace(layout, settings=dataclasses.replace(settings, chunk_frames=chunk))
    cut = []
    stream = AudioStream(None, layout, lambda item: cut.append(item.piece), lambda: None)
    column = np.zeros(layout.codebooks, dtype=np.int64)
    for _ in range(layout.codebooks + 4 * frames):
        stream.add(column)
        if stream.sent == 0 and stream.first_due_in <= 0:
            stream.cut_first()
        piece = next((piece for piece in cut if piece.codes.shape[1] == frames), None)
        if piece is not None:
            return stream.span(piece)
    raise ValueError(f"a stream cuts no piece of {frames} frames")


if __name__ == "__main__":
    main()
