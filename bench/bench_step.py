"""Cost of one batched decoding step, and of its part outside the forward pass, against the number of rows.

Run:  .venv/bin/python bench/bench_step.py [--rows 1 8] [--steps 200] [--baseline OLD_DECODER.py]
      .venv/bin/python bench/bench_step.py --model bosonai/higgs-audio-v2-generation-3B-base \\
          --audio-tokenizer bosonai/higgs-audio-v2-tokenizer --device cuda --dtype bfloat16 --rows 1 16

``BatchDecoder`` (``decoder.py``) is driven directly, without the scheduler or HTTP, by default over the
tiny random-weight models of ``tests/tiny_models.py`` on the CPU in float32. For each row count ``r`` a
decoder of ``r`` slots is filled with ``r`` sampled audio requests (temperature 0.7, top-p 0.95, top-k 50,
RAS window 7, seeds 0..r-1), warmed up, and then runs ``--steps`` steps; the step time and the time spent
outside ``_run_forward`` (sampling, RAS, the delay pattern, the state update, the copy to the host) are
medians over the steps. The number of torch operators dispatched outside the forward pass in one step is
counted too (a stand-in for kernel launches: it should not grow with the rows).

``--baseline FILE`` loads another ``decoder.py`` (e.g. ``git show main:decoder.py > /tmp/old.py``) and
measures it in the same run, interleaved per row count, for a before/after ratio on the same machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

from _common import service_settings, workspace, write_tiny_models


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def _operators(decoder) -> int:
    """Torch operators dispatched by one step, those of the forward pass left out."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0
            self.paused = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += not self.paused
            return func(*args, **(kwargs or {}))

    counter = Count()
    forward = decoder._run_forward

    def paused(*args):
        counter.paused = True
        try:
            return forward(*args)
        finally:
            counter.paused = False

    decoder._run_forward = paused
    try:
        with torch.inference_mode(), counter:
            decoder.step()
    finally:
        del decoder._run_forward
    return counter.count


def _measure(module, engine, inputs, rows: int, steps: int, warmup: int) -> tuple[float, float, int]:
    """Median step time, median time outside the forward pass (seconds), operators outside it."""
    import torch

    decoder = module.BatchDecoder(
        engine._model,
        slots=rows,
        max_len=engine.max_context,
        audio_out_token=engine._config.audio_out_token_idx,
        audio_eos_token=engine._audio_eos_id,
        suppress_in_text=engine._audio_start_ids,
        graphs=engine.device == "cuda",
        length_buckets=[engine.max_context],
    )
    for slot in range(rows):
        sampling = module.Sampling(temperature=0.7, top_p=0.95, top_k=50, ras_window=7, seed=slot)
        decoder.prefill(slot=slot, inputs=inputs, audio_output=True, sampling=sampling)
    sync = torch.cuda.synchronize if engine.device == "cuda" else (lambda: None)
    forward = decoder._run_forward
    spent = [0.0]

    def timed(*args):
        sync()
        started = time.perf_counter()
        out = forward(*args)
        sync()
        spent[0] += time.perf_counter() - started
        return out

    decoder._run_forward = timed
    totals, outside = [], []
    for i in range(warmup + steps):
        spent[0] = 0.0
        sync()
        started = time.perf_counter()
        decoder.step()  # ends with the copy to the host, which waits for the device
        elapsed = time.perf_counter() - started
        if i >= warmup:
            totals.append(elapsed)
            outside.append(elapsed - spent[0])
    del decoder._run_forward
    return statistics.median(totals), statistics.median(outside), _operators(decoder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--baseline", help="another decoder.py to measure side by side")
    parser.add_argument("--model", help="generation model (hub id or folder); default: the tiny model")
    parser.add_argument("--audio-tokenizer", help="audio tokenizer (hub id or folder); default: the tiny one")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    with workspace() as tmp:
        if args.model:
            models = {"model": args.model, "audio_tokenizer": args.audio_tokenizer}
        else:
            tiny = write_tiny_models(tmp)
            models = {"model": tiny["HIGGS_MODEL"], "audio_tokenizer": tiny["HIGGS_AUDIO_TOKENIZER"]}
        import torch

        import decoder
        from engine import GenerationRequest, Turn, load_engine

        settings = service_settings(
            **models,
            voices_dir=tmp / "voices",
            device=args.device,
            dtype=args.dtype,
            kv_cache_lengths=[args.kv_cache_length],
            max_batch_size=1,
            cuda_graphs=False,
        )
        torch.set_num_threads(args.threads)
        engine = load_engine(settings)
        turns = [Turn("system", "Generate audio."), Turn("user", "Many rows, one step.")]
        inputs = engine._prepare(GenerationRequest(turns, True, args.steps, 0.7, 0.95, 50)).inputs
        contenders = {"new": decoder}
        if args.baseline:
            contenders = {"old": _load(args.baseline, "decoder_baseline"), **contenders}
        print(f"{args.device} {args.dtype}, {args.steps} steps after {args.warmup} warm-up, medians")
        for rows in args.rows:
            results = {
                name: _measure(module, engine, inputs, rows, args.steps, args.warmup)
                for name, module in contenders.items()
            }
            for name, (total, outside, operators) in results.items():
                print(
                    f"rows {rows:3d} {name:>4}: step {total * 1e3:8.3f} ms, outside the forward "
                    f"{outside * 1e3:8.3f} ms, {operators:4d} operators outside the forward"
                )
            if "old" in results:
                old, new = results["old"], results["new"]
                print(
                    f"rows {rows:3d} old/new: step x{old[0] / new[0]:.2f}, outside the forward "
                    f"x{old[1] / new[1]:.2f}, operators {old[2]} -> {new[2]}"
                )
        engine.close()


if __name__ == "__main__":
    main()
