"""Where a prefill's time goes: one prompt, and several collated, run into the decoder's slots.

Run:  .venv/bin/python bench/bench_prefill.py
      .venv/bin/python bench/bench_prefill.py --model MODEL --audio-tokenizer TOKENIZER --device cuda \\
          --dtype bfloat16 --rows 1 4 8

``BatchDecoder.prefill_many`` is driven directly over the engine's own prompt (a speech request's turns,
with ``--reference SECONDS`` of a voice reference before them, built by ``engine._prepare``; the tiny
random-weight models on the CPU unless a model is named). For each row count it prints the median wall
time of a prefill (ending with the first tokens on the host), and of prompts of lengths not seen before,
side by side: as the service runs them, and with each of its choices undone (``VARIANTS``: on CUDA the
prefill's graphs, which the service replays for prompts padded to their lengths; then, also
without the graphs, cuDNN's attention allowed, and upstream's forward instead of the decoder's own
layers), then PyTorch's profiler on
one: the operators' own CPU time and, on CUDA, the GPU's kernels, so that a prefill bound by the host
(many small operators, copies) shows apart from one bound by the device.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from _common import (
    add_model_arguments,
    check_model_arguments,
    models,
    print_profile,
    service_settings,
    tone_reference,
    workspace,
)

VARIANTS = ("service", "no graphs", "any attention kernel", "upstream's forward")
"""The service's prefill; eager (no graphs: ``Prefiller.padded_lengths`` empty), and so are the next
two: with whichever attention kernel PyTorch prefers (``prefill.PREFILL_ATTENTION`` None); through
upstream's forward, not the decoder's own layers (``Prefiller.own`` off)."""


def _prefill(engine, prompt, rows: int, sampling) -> None:
    """``prompt`` into slots ``0..rows-1`` (collated when several), its first tokens; the slots freed."""
    from decoder import Admission

    batch = None if rows == 1 else engine.higgs.collate([prompt.sample] * rows)
    admissions = [Admission(slot, prompt.inputs, True, sampling, prompt.tokens) for slot in range(rows)]
    engine._decoder.prefill_many(admissions, batch)
    for slot in range(rows):
        engine._decoder.release(slot)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text", default="Please read this short line out loud now")
    parser.add_argument(
        "--reference", type=float, default=0, help="seconds of a voice reference in the prompt (a tone)"
    )
    add_model_arguments(parser)
    args = parser.parse_args()
    check_model_arguments(parser, args)

    with workspace() as tmp:
        model, audio_tokenizer = models(args, tmp)
        import torch
        from torch.profiler import ProfilerActivity, profile

        import prefill
        from decoder import Sampling
        from engine import load_engine
        from generation import GenerationRequest, Turn

        settings = service_settings(
            model,
            audio_tokenizer,
            tmp / "voices",
            device=args.device,
            dtype=args.dtype,
            kv_cache_lengths=[1024],
            max_batch_size=max(args.rows),
        )
        engine = load_engine(settings)
        cuda = args.device == "cuda"
        heard = []  # a voice reference: a tone of --reference seconds and its transcript
        if args.reference:
            tone = tone_reference(engine, args.reference)
            heard = [Turn("user", "Read this line."), Turn("assistant", audio=tone)]
        opening = [Turn("system", "Generate audio following instruction."), *heard]
        turns = [*opening, Turn("user", args.text)]
        request = GenerationRequest(turns, True, 100, 0.7, 0.95, 50, seed=0)
        started = time.perf_counter()
        prompt = engine._prepare(request)
        print(
            f"{args.device} {args.dtype}: prompt of {prompt.tokens} tokens, built in "
            f"{(time.perf_counter() - started) * 1e3:.1f} ms"
        )
        fills = engine._decoder.prefiller
        service_attention = prefill.PREFILL_ATTENTION
        graphed = fills.padded_lengths  # (CUDA: the lengths captured; none on a CPU)
        captured = len(fills.graphs)
        print(f"prefill graphs: {captured}, prompts padded to {graphed or 'none'}")
        lengths = itertools.count(len(args.text.split()) + 1)
        sampling = Sampling(temperature=0.7, top_p=0.95, top_k=50, ras_window=7, seed=0)

        for rows in args.rows:
            started = time.perf_counter()
            _prefill(engine, prompt, rows, sampling)
            first = time.perf_counter() - started
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                _prefill(engine, prompt, rows, sampling)
                times.append(time.perf_counter() - started)
            fresh = {}  # prompts of lengths not seen before: shapes new to the kernels' caches
            for variant in VARIANTS:
                prefill.PREFILL_ATTENTION = None if variant == "any attention kernel" else service_attention
                fills.own = variant != "upstream's forward"
                fills.padded_lengths = graphed if variant == "service" else ()
                fresh[variant] = []
                for _ in range(args.repeats):
                    words = " ".join(["word"] * next(lengths))
                    new = engine._prepare(
                        GenerationRequest([*opening, Turn("user", words)], True, 100, 0.7, 0.95, 50)
                    )
                    started = time.perf_counter()
                    _prefill(engine, new, rows, sampling)
                    fresh[variant].append(time.perf_counter() - started)
            prefill.PREFILL_ATTENTION, fills.own = service_attention, True
            fills.padded_lengths = graphed
            print(
                f"rows {rows:3d}: prefill {statistics.median(times) * 1e3:.2f} ms (median of {args.repeats});"
                f" first {first * 1e3:.2f} ms; prompts of lengths not seen before: "
                + ", ".join(f"{v} {statistics.median(fresh[v]) * 1e3:.2f} ms" for v in VARIANTS)
            )
            activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
            with profile(activities=activities) as prof:
                for _ in range(2):
                    _prefill(engine, prompt, rows, sampling)
                if cuda:
                    torch.cuda.synchronize()
            print_profile(prof, 2, False, "prefill", n=12)
            if cuda:
                print_profile(prof, 2, True, "prefill", n=12)
        engine.close()


if __name__ == "__main__":
    main()
