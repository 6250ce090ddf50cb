"""A text answer's host work per decoding step: decoding all its tokens again at every step (as this service
did before ``detokenize.py``) against ``Detokenizer``, side by side in one run; then the engine's own.

Run:  .venv/bin/python bench/bench_text.py [--rows 16] [--lengths 100 500 1000 2000]
      .venv/bin/python bench/bench_text.py --model MODEL --audio-tokenizer TOKENIZER   (the real tokenizer)

The batched engine streams every text row's new text at every step on its one scheduler thread: what that
costs is host time each step adds, for all rows together (on CUDA it overlaps the GPU's next step only
while it is shorter). Two measurements:

* **per step at answer length L**: for ``--rows`` rows whose answers are L tokens long (a multilingual
  prose encoded by the model's tokenizer, so characters split across tokens occur), one step's text work
  for all rows: the old way (``tokenizer.decode`` of the row's L tokens, then the stop string looked for in
  the whole text) against ``Detokenizer.add`` (the mean over the 50 tokens after L), and the ratio;
* **the engine**: ``--rows`` text requests of ``--max-tokens`` at once through the engine (the tiny one on
  the CPU unless ``--model``): its ``tokens`` seconds per step (``engine.work()``: the host's work on a
  step's output) beside ``launch`` (the step itself; on a CPU its whole computation).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from _common import run_script, service_settings

PROSE = (
    "The quick brown fox jumps over the lazy dog; naïve café owners say «bonjour» "
    "and 日本語 readers smile 🎉. "
)
STOP = "<END>"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16, help="text answers decoding together")
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 500, 1000, 2000])
    parser.add_argument("--max-tokens", type=int, default=400, help="each engine request's length")
    parser.add_argument("--repeats", type=int, default=5)
    run_script(parser, run)


def per_step(tokenizer, rows: int, length: int, repeats: int) -> tuple[float, float]:
    """Seconds of one step's text work for ``rows`` answers of ``length`` tokens: the old way, the new."""
    from detokenize import Detokenizer, ids_decoder

    ids = tokenizer.encode(PROSE * (length // 10 + 10), add_special_tokens=False)[: length + 50]

    def old() -> None:
        for _ in range(rows):
            text = tokenizer.decode(ids[:length], skip_special_tokens=True)
            text.find(STOP)

    old_times = []
    for _ in range(repeats):
        started = time.perf_counter()
        old()
        old_times.append(time.perf_counter() - started)

    decode = ids_decoder(tokenizer)
    new_times = []
    for _ in range(repeats):
        detokenizers = [Detokenizer(decode, [STOP]) for _ in range(rows)]
        for d in detokenizers:
            for token in ids[:length]:
                d.add(token)
        started = time.perf_counter()
        for token in ids[length:]:
            for d in detokenizers:
                d.add(token)
        new_times.append((time.perf_counter() - started) / (len(ids) - length))
    return statistics.median(old_times), statistics.median(new_times)


def run(args: argparse.Namespace, model: str, audio_tokenizer: str, voices_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    print(f"text work per step, {args.rows} rows ({type(tokenizer).__name__}):")
    print(f"{'answer length':>14} {'decode all':>12} {'Detokenizer':>12} {'ratio':>8}")
    for length in args.lengths:
        old, new = per_step(tokenizer, args.rows, length, args.repeats)
        print(f"{length:>9} tokens {old * 1e3:>9.3f} ms {new * 1e3:>9.3f} ms {new / old:>7.4f}x")

    from engine import load_engine
    from generation import GenerationRequest, Turn

    device = getattr(args, "device", "cpu")
    dtype = "float32" if args.dtype == "auto" and device == "cpu" else args.dtype
    settings = service_settings(
        model, audio_tokenizer, voices_dir, device=device, dtype=dtype, max_batch_size=args.rows
    )
    engine = load_engine(settings)
    engine.warm_up()

    async def one(seed: int) -> int:
        request = GenerationRequest(
            turns=[Turn("user", "Tell me a long story.")],
            audio_output=False,
            max_new_tokens=args.max_tokens,
            temperature=0.7,
            top_p=0.95,
            top_k=50,
            seed=seed,
        )
        result = await engine.generate(request)
        return result.completion_tokens

    async def all_at_once() -> list[int]:
        return await asyncio.gather(*(one(seed) for seed in range(args.rows)))

    before = engine.work()
    tokens = asyncio.run(all_at_once())
    after = engine.work()
    engine.close()
    steps = after.steps - before.steps
    spent = {k: (after.scheduler[k] - before.scheduler[k]) / max(steps, 1) * 1e3 for k in after.scheduler}
    print(
        f"engine, {args.rows} text requests at once ({min(tokens)}-{max(tokens)} tokens, {steps} steps): "
        f"tokens {spent['tokens']:.3f} ms per step, launch {spent['launch']:.3f} ms, "
        f"wait {spent['wait']:.3f} ms"
    )


if __name__ == "__main__":
    main()
