"""One batched decoding step, alone and inside the engine: its time and the operators (kernels) it runs.

Run:  .venv/bin/python bench/bench_step.py [--rows 1 8] [--lengths 1024] [--steps 100] [--baseline REV]
                                           [--by-lengths] [--profile]
      .venv/bin/python bench/bench_step.py --model MODEL --audio-tokenizer TOKENIZER --device cuda \\
          --dtype bfloat16 --rows 1 16

``BatchDecoder`` (``decoder.py``) is driven directly, over the tiny random-weight models of
``tests/tiny_models.py`` on the CPU in float32 unless a model is named. For each row count a decoder of
that many slots is filled with sampled audio requests (temperature 0.7, top-p 0.95, top-k 50, RAS window
7), and reports:

* **operators per step**, and per layer of the forward pass: aten operators one eager step dispatches,
  and how many of them compute (write memory: a kernel on a GPU; inside a CUDA graph a kernel still costs
  the GPU microseconds to start, so at batch 1, where every kernel is tiny, their number weighs more than
  their work). Exact on any machine; in ``--dtype bfloat16`` the dtype conversions count as they do on a
  GPU;
* **step**: the median wall time of a step (graph replays on CUDA, ending with the copy to the host), at
  each of ``--lengths`` (the step's attention length: the service rounds a step up to the smallest of
  ``HIGGS_KV_CACHE_LENGTHS`` that holds its longest row);
* **engine**: on the same model, the median time per step of one request decoded by the whole engine
  (scheduler thread, codec thread, streaming), from its steps counter: what the step alone does not
  explain is the engine's own overhead.

``--baseline REV`` (a git revision, e.g. ``HEAD~1``) measures that revision's decoder in the same run for a
before/after ratio: its ``decoder.py`` with its own ``layers.py`` and ``prefill.py`` (where it has them), not
this tree's (``--baseline FILE`` takes a ``decoder.py`` of its own, one from before they were split out).
``--profile`` also prints, per row count, where an eager step's time goes (PyTorch's profiler; the GPU's
kernels on CUDA, the operators' own CPU time otherwise): what a graphed step replays, broken down.
``--by-lengths`` also measures the step with attention by each row's length (``HIGGS_ATTENTION_BY_LENGTHS``:
each row reads its own keys, not its bucket's) side by side, after the start-up check that the service runs
(on the CPU, and in float32, its kernel is missing: it says so). """

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, print_profile, service_settings, workspace, write_tiny_models


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def _baseline(given: str):
    """The decoder module of ``--baseline``: a file, or a git revision's ``decoder.py`` imported with that
    revision's ``layers.py`` and ``prefill.py`` (those it has) in place of this tree's."""
    if Path(given).is_file():
        return _load(given, "decoder_baseline")
    with tempfile.TemporaryDirectory(prefix="decoder-baseline-") as kept:
        folder = Path(kept)
        for name in ("decoder.py", "layers.py", "prefill.py"):
            shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{given}:{name}"], capture_output=True)
            if shown.returncode == 0:
                (folder / name).write_bytes(shown.stdout)
        if not (folder / "decoder.py").exists():
            raise SystemExit(f"--baseline {given!r}: neither a file nor a git revision with a decoder.py")
        siblings = {name: sys.modules.pop(name) for name in ("layers", "prefill") if name in sys.modules}
        sys.path.insert(0, kept)
        try:
            return _load(str(folder / "decoder.py"), "decoder_baseline")
        finally:
            sys.path.remove(kept)
            for name in ("layers", "prefill"):  # the baseline's, held by its decoder module only
                sys.modules.pop(name, None)
            sys.modules.update(siblings)


def _operators(decoder) -> tuple[int, int, int, int]:
    """Aten operators dispatched by one eager step, those of them in the forward pass (views count too:
    they launch nothing, but the same views are on both sides of a comparison), and the operators that
    compute, in the step and in its forward pass: that write memory (in place, or a result not sharing its
    storage with an input), which is what launches a kernel on a GPU (a conversion to the dtype a tensor
    already has, a view, does not; a conversion between dtypes does)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def storages(value) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in tree_leaves(value) if isinstance(t, torch.Tensor)}

    class Count(TorchDispatchMode):
        total = forward = computing = forward_computing = 0
        inside = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.total += 1
            Count.forward += Count.inside
            out = func(*args, **(kwargs or {}))
            if func._schema.is_mutable or storages(out) - storages((args, kwargs)):
                Count.computing += 1
                Count.forward_computing += Count.inside
            return out

    forward = decoder._forward

    def counted(*args):
        Count.inside = True
        try:
            return forward(*args)
        finally:
            Count.inside = False

    graphs, decoder.graphs_enabled = decoder.graphs_enabled, False
    decoder._forward = counted
    try:
        with torch.inference_mode(), Count():
            decoder.step()
    finally:
        decoder.graphs_enabled = graphs
        del decoder._forward
    return Count.total, Count.forward, Count.computing, Count.forward_computing


def _decoder(module, engine, inputs, rows: int, length: int):
    decoder = module.BatchDecoder(
        engine.higgs.model,
        slots=rows,
        max_len=engine._decoder.max_len,
        audio_out_token=engine.higgs.config.audio_out_token_idx,
        audio_eos_token=engine.higgs.audio_eos_id,
        suppress_in_text=engine.higgs.audio_start_ids,
        graphs=engine.device == "cuda",
        length_buckets=[length],
    )
    for slot in range(rows):
        sampling = module.Sampling(temperature=0.7, top_p=0.95, top_k=50, ras_window=7, seed=slot)
        decoder.prefill(slot=slot, inputs=inputs, audio_output=True, sampling=sampling)
    return decoder


def _step_time(decoder, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        decoder.step()  # ends with the copy to the host, which waits for the device
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _profile(decoder, steps: int = 20) -> None:
    """The top operators (kernels on CUDA) of ``steps`` eager steps, by their own time, per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = decoder.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    graphs, decoder.graphs_enabled = decoder.graphs_enabled, False
    try:
        decoder.step()  # warm-up
        with profile(activities=activities) as prof:
            for _ in range(steps):
                decoder.step()
            if cuda:
                torch.cuda.synchronize()
    finally:
        decoder.graphs_enabled = graphs

    print_profile(prof, steps, cuda, "eager step")


def _engine_step_time(engine, request, steps: int) -> float:
    """Seconds per step of one request through the engine (two lengths: the fixed costs cancel)."""
    from dataclasses import replace

    def run(n: int) -> float:
        started = time.perf_counter()
        asyncio.run(engine.generate(replace(request, max_new_tokens=n)))
        return time.perf_counter() - started

    run(steps)  # warm-up
    short = statistics.median(run(steps // 4) for _ in range(3))
    long = statistics.median(run(steps) for _ in range(3))
    return (long - short) / (steps - steps // 4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024], help="attention lengths to measure")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--baseline",
        help="a git revision (or a single-file decoder.py) whose decoder to measure side by side",
    )
    parser.add_argument("--model", help="generation model (hub id or folder); default: the tiny model")
    parser.add_argument("--audio-tokenizer", help="audio tokenizer (hub id or folder); default: the tiny one")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--profile", action="store_true", help="where an eager step's time goes")
    parser.add_argument(
        "--by-lengths",
        action="store_true",
        help="also the step with attention by each row's length (HIGGS_ATTENTION_BY_LENGTHS), side by side",
    )
    args = parser.parse_args()

    with workspace() as tmp:
        if args.model:
            models = {"model": args.model, "audio_tokenizer": args.audio_tokenizer}
        else:
            tiny = write_tiny_models(tmp)
            models = {"model": tiny["HIGGS_MODEL"], "audio_tokenizer": tiny["HIGGS_AUDIO_TOKENIZER"]}
        import torch

        import decoder
        from engine import load_engine
        from generation import GenerationRequest, Turn

        settings = service_settings(
            **models,
            voices_dir=tmp / "voices",
            device=args.device,
            dtype=args.dtype,
            kv_cache_lengths=[max(args.lengths)],
            max_batch_size=1,
        )
        torch.set_num_threads(args.threads)
        engine = load_engine(settings)
        turns = [Turn("system", "Generate audio."), Turn("user", "Many rows, one step.")]
        request = GenerationRequest(turns, True, args.steps, 0.7, 0.95, 50, seed=0)
        inputs = engine._prepare(request).inputs
        contenders = {"new": (decoder, False)}
        if args.baseline:
            contenders = {"old": (_baseline(args.baseline), False), **contenders}
        if args.by_lengths:
            contenders["bylen"] = (decoder, True)
        layers = len(engine.higgs.model.layers)
        print(f"{args.device} {args.dtype}, {layers} layers; {args.steps} steps after {args.warmup}, medians")
        alone_one_row = None
        for rows, length in [(r, n) for n in args.lengths for r in args.rows]:
            results = {}
            for name, (module, by_lengths) in contenders.items():
                made = _decoder(module, engine, inputs, rows, length)
                if by_lengths:
                    agree, seen = made.check_attention_by_lengths()
                    print(f"attention by each row's length: {'on' if agree else 'OFF'} ({seen})")
                    if not agree:
                        continue
                    made.by_lengths_from = 0
                operators, forward, computing, forward_computing = _operators(made)
                results[name] = (operators, _step_time(made, args.steps, args.warmup), computing)
                print(
                    f"rows {rows:3d}, length {length:5d} {name:>4}: {operators:5d} operators per step "
                    f"({computing} compute), "
                    f"{forward / layers:5.1f} per layer in the forward pass "
                    f"({forward_computing / layers:.1f} compute); "
                    f"step {results[name][1] * 1e3:8.3f} ms"
                )
                if rows == 1 and name == "new" and alone_one_row is None:
                    alone_one_row = results[name][1]
                if args.profile and name != "old":
                    _profile(made)
                del made
            new_ops, new_time, new_computing = results["new"]
            for name, (ops, took, computing) in results.items():
                if name != "new":
                    ratio = (
                        f"operators x{ops / new_ops:.2f}, computing x{computing / new_computing:.2f}, "
                        f"step x{took / new_time:.2f}"
                    )
                    print(f"rows {rows:3d}, length {length:5d} {name}/new: {ratio}")
        per_step = _engine_step_time(engine, request, args.steps)
        ratio = f"; x{per_step / alone_one_row:.2f} the step alone at 1 row" if alone_one_row else ""
        print(f"engine, one request: {per_step * 1e3:.3f} ms per step{ratio}")
        engine.close()


if __name__ == "__main__":
    main()
