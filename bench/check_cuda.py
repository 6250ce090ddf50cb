"""Check the engine's CUDA paths, which no CPU test reaches (one short run on a CUDA machine).

Run:  python bench/check_cuda.py --device cuda [--dtype float32] [--model M --audio-tokenizer T]
      .venv/bin/python bench/check_cuda.py            # a dry run of the script on the CPU (no graphs there)

The engine is loaded through ``load_engine`` on CUDA twice, over the tiny random-weight models of
``tests/tiny_models.py`` unless a model is named: with CUDA graphs (the default) and two steps launched ahead
(``HIGGS_LOOKAHEAD_STEPS=2``: three host buffers in turn), and without graphs, one step ahead. For the first
it prints how many graphs of the decoding step and of the codec were captured and which shapes failed (none
should: a failed shape decodes eagerly for good, several times slower); that a slot filled on the prefill
stream while steps run holds what a fill alone gives it (``prefill_beside_steps``), and that the prefill's
graphs (prompts padded to their lengths) fill slots as the eager fill does; for the second, the
decoder's own prefill against upstream's forward (``Prefiller.own``); then the same requests go through each
engine: 4 seeded audio requests at once (one of them greedy) and a text request beside them. Their answers are
compared: in float32 a graph replays the kernels that the eager step runs, so the tokens should be the same;
in bfloat16 they should mostly be (a graph's cuBLAS may choose other kernels). Where an audio answer's codes
agree, its samples must too, within ``CODEC_TOLERANCE`` (the codec's graphs against its eager decode). Each
engine's steps must have been timed on the GPU (``EngineWork.step_gpu``, from their CUDA events: counted, and
no more per step than the loop's time), and the streams' last pieces must have gone through the codec's graphs
(``Layout.end_frames``). The two attend masked; in 16 bits a third engine runs with attention by each row's
length in every bucket (``HIGGS_ATTENTION_BY_LENGTHS``): its start-up check must pass, and its answers are
compared with the masked engine's. The graphed engine answers the requests again with the GPU held back before
every step (``gpu_behind``: the host as far ahead as it may go), and in float32 must answer the same. Exits
non-zero when a capture failed, when a slot filled beside steps or by a prefill graph differs, when float32
answers or prefills differ, when steps went untimed, when a last piece was decoded without a graph, or when
attention by lengths failed its check.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from _common import (
    add_model_arguments,
    check_model_arguments,
    models,
    service_settings,
    tone_reference,
    workspace,
)

TEXT = "Hello there, and welcome to the show."


def requests(generation, n: int = 4) -> list:
    """The audio requests (seeds 1..n, the last greedy) and one text request."""
    scene = "Generate audio following instruction."
    turns = [generation.Turn("system", scene), generation.Turn("user", TEXT)]
    audio = [
        generation.GenerationRequest(turns, True, 60, 0.0 if i == n else 0.8, 0.95, 50, seed=i)
        for i in range(1, n + 1)
    ]
    text = generation.GenerationRequest([generation.Turn("user", TEXT)], False, 24, 0.7, 0.95, 50, seed=9)
    return [*audio, text]


def admitted(engine, batch: list) -> tuple[list, list]:
    """The requests' prompts, and their admissions into slots 0, 1, ... in order."""
    prompts = [engine._prepare(r) for r in batch]
    return prompts, [engine._admission(r, p, i) for i, (p, r) in enumerate(zip(prompts, batch, strict=True))]


def fills_apart(ours: tuple[list, list], theirs: tuple[list, list]) -> tuple[float, bool]:
    """Two fills of the same prompts, each (first tokens, each row's caches): the largest cache difference
    relative to the largest value of ``theirs``, and whether the first tokens are the same."""
    import torch

    (firsts, caches), (their_firsts, their_caches) = ours, theirs
    scale = max(float(kv.abs().max()) for row in their_caches for kv in row)
    diff = max(
        float((a - b).abs().max())
        for row, their_row in zip(caches, their_caches, strict=True)
        for a, b in zip(row, their_row, strict=True)
    )
    return diff / scale, all(torch.equal(a, b) for a, b in zip(firsts, their_firsts, strict=True))


def own_prefill(engine, generation, dtype: str) -> bool:
    """The decoder's own prefill (``Prefiller._own``) against upstream's forward over the same
    prompts padded together (a default-voice speech prompt, a text question, a prompt with a voice
    reference): the slots' caches (the largest difference relative to the largest value) and the first
    tokens. In float32 they should agree to rounding."""

    scene = "Generate audio following instruction."
    reference = tone_reference(engine)
    Turn = generation.Turn
    batch = [
        generation.GenerationRequest([Turn("user", TEXT)], True, 10, 0.8, 0.95, 50, seed=1),
        generation.GenerationRequest(
            [Turn("system", scene), Turn("user", TEXT + " And a few words more.")], False, 10, 0.0, 1.0, 0
        ),
        generation.GenerationRequest(
            [Turn("system", scene), Turn("user", "Say it."), Turn("assistant", audio=reference),
             Turn("user", TEXT)], True, 10, 0.8, 0.95, 50, seed=3,
        ),
    ]  # fmt: skip
    prompts, admissions = admitted(engine, batch)
    small = engine.higgs.decoder(len(batch), 1024)
    collated = engine.higgs.collate([p.sample for p in prompts])
    filled = {}
    for path in ("own", "upstream"):
        small.prefiller.own = path == "own"
        firsts = small.prefill_many(admissions, collated)
        caches = [[k[i, :, : p.tokens].float().clone() for k in small.keys] for i, p in enumerate(prompts)]
        filled[path] = firsts, caches
        for i in range(len(batch)):
            small.release(i)
    apart, same = fills_apart(filled["own"], filled["upstream"])
    print(
        f"prefill, own layers against upstream's forward ({len(batch)} prompts padded together): "
        f"largest cache difference {apart:.1e} of the largest value; first tokens "
        + ("same" if same else "differ")
    )
    return (same and apart < 1e-3) or dtype != "float32"


def prefill_graphs(engine, generation) -> bool:
    """Prompts filled by the prefill's CUDA graphs (padded to ``PREFILL_GRAPH_LENGTHS``) against the same
    prompts filled eagerly, unpadded: one prompt, three of different lengths together (an audio and two
    text answers), one with a voice reference, and all four together. The slots' caches should agree to the
    dtype's rounding (the padded attention is masked, the unpadded one causal), the first tokens be the
    same."""
    import torch

    import prefill

    small = engine._decoder
    fills = small.prefiller
    scene = "Generate audio following instruction."
    Turn = generation.Turn
    batch = [
        generation.GenerationRequest([Turn("system", scene), Turn("user", TEXT)], True, 10, 0.8, 0.95, 50, 1),
        generation.GenerationRequest([Turn("user", "Hi.")], False, 10, 0.0, 1.0, 0),
        generation.GenerationRequest([Turn("user", TEXT * 3)], False, 10, 0.8, 0.95, 50, seed=3),
        generation.GenerationRequest(
            [Turn("system", scene), Turn("user", "Say it."), Turn("assistant", audio=tone_reference(engine)),
             Turn("user", TEXT)], True, 10, 0.8, 0.95, 50, seed=4,
        ),
    ]  # fmt: skip
    prompts, admissions = admitted(engine, batch)
    ok, lengths = True, fills.padded_lengths
    for group in ([0], [0, 1, 2], [3], [0, 1, 2, 3]):
        collated = engine.higgs.collate([prompts[i].sample for i in group]) if len(group) > 1 else None
        filled = []
        for padded in (lengths, ()):
            fills.padded_lengths = padded
            firsts = small.prefill_many([admissions[i] for i in group], collated)
            caches = [[kv[i, :, :, : prompts[i].tokens].float().clone() for kv in small.cache] for i in group]
            filled.append((firsts, caches))
            for i in group:
                small.release(i)
        fills.padded_lengths = lengths
        diff, same = fills_apart(*filled)
        tolerance = prefill.OWN_PREFILL_TOLERANCE.get(small.dtype, 1e-1)
        print(
            f"prefill graphs ({len(fills.graphs)} captured, failed: "
            f"{sorted(fills.failed) or 'none'}), {len(group)} prompt(s) against the eager fill: "
            f"largest cache difference {diff:.1e} of the largest value; first tokens "
            + ("same" if same else "differ")
        )
        ok &= diff <= tolerance and (same or small.dtype != torch.float32)
    return ok and bool(fills.graphs) and not fills.failed and bool(lengths)


SLEEP_CYCLES = 40_000_000
"""``torch.cuda._sleep``'s length that puts one stream's work well after the other's (about 20 ms)."""


def prefill_beside_steps(engine, generation) -> bool:
    """A slot filled on the engine's prefill stream while another slot's steps run on the loop's stream (as
    the engine does with ``prefill_beside_steps``) holds the cache that the fill gives it with no step
    beside it, bit for bit (the same kernels), and decodes the same tokens from then on. Steps write a
    reserved slot's parked position only, and the fill is ordered after the steps launched before it.
    Tried for three newcomers (speech, a text answer, speech with a voice reference) and three orders on
    the GPU: as it comes, the steps held back behind the fill (``torch.cuda._sleep`` on their stream), and
    the fill held back behind the steps."""
    import torch

    small = engine._decoder
    Turn = generation.Turn
    scene = "Generate audio following instruction."
    running_request = generation.GenerationRequest(
        [Turn("system", scene), Turn("user", TEXT)], True, 60, 0.8, 0.95, 50, seed=1
    )
    newcomers = {
        "speech": generation.GenerationRequest(
            [Turn("system", scene), Turn("user", "A newcomer, filled while the other one decodes.")],
            True, 60, 0.8, 0.95, 50, seed=2,
        ),
        "text": generation.GenerationRequest([Turn("user", "Hi there.")], False, 60, 0.8, 0.95, 50, seed=3),
        "cloned": generation.GenerationRequest(
            [Turn("system", scene), Turn("user", "Say it."), Turn("assistant", audio=tone_reference(engine)),
             Turn("user", "A cloned newcomer.")], True, 60, 0.8, 0.95, 50, seed=4,
        ),
    }  # fmt: skip
    stream = engine._prefill_stream

    def fill_beside(newcomer, running, steps: int, held: str | None = None) -> tuple[list, list]:
        small.prefill_many([running])
        small.reserve([newcomer.slot])
        after = torch.cuda.Event()
        after.record()
        with torch.cuda.stream(stream):
            stream.wait_event(after)
            if held == "fill":
                torch.cuda._sleep(SLEEP_CYCLES)
            filled = small.fill([newcomer])
            ready = torch.cuda.Event()
            ready.record(stream)
        if held == "steps":
            torch.cuda._sleep(SLEEP_CYCLES)
        for _ in range(steps):  # launched while the fill's kernels run
            small.launch()
        torch.cuda.current_stream().wait_event(ready)
        cache = [kv[newcomer.slot, :, :, : newcomer.tokens].float().cpu() for kv in small.cache]
        small.occupy([newcomer], filled)
        tokens = [small.step()[newcomer.slot].tolist() for _ in range(12)]
        small.release(running.slot)
        small.release(newcomer.slot)
        return cache, tokens

    ok = True
    for kind, request in newcomers.items():
        # The newcomer in slot 0, below the running slot 1: the steps beside its fill then cover its row (a
        # step's rows run up to its highest busy slot), as they do in the engine whenever a higher slot runs.
        newcomer, running = admitted(engine, [request, running_request])[1]
        assert newcomer.slot < running.slot
        alone = fill_beside(newcomer, running, 0)
        for held in (None, "steps", "fill"):
            beside = fill_beside(newcomer, running, 8, held)
            same_cache = all(torch.equal(a, b) for a, b in zip(alone[0], beside[0], strict=True))
            same_tokens = alone[1] == beside[1]
            order = {None: "as it comes", "steps": "the steps held back", "fill": "the fill held back"}[held]
            print(
                f"prefill beside steps ({kind} newcomer, {order}): the filled slot's cache "
                f"{'same' if same_cache else 'DIFFERS'}, its tokens {'same' if same_tokens else 'DIFFER'} "
                "(against a fill with no step beside it)"
            )
            ok &= same_cache and same_tokens
    return ok


def gpu_behind(engine, batch: list, expected: list, dtype: str) -> bool:
    """The same requests with the GPU held back before every step (``torch.cuda._sleep``, about 2 ms), so
    that the host launches as far ahead as it may (``HIGGS_LOOKAHEAD_STEPS``: every host buffer in use) and
    reads each step's tokens late: the answers must be the same as when the GPU kept up (in float32; in 16
    bits the requests may join at other steps, and kernels round with the batch)."""
    import torch

    small = engine._decoder
    launch = small.launch

    def late():
        torch.cuda._sleep(SLEEP_CYCLES // 10)
        return launch()

    small.launch = late
    try:
        got = asyncio.run(answers(engine, batch))
    finally:
        del small.launch  # (the method again)
    ok = True
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        same, verdict = compared(a, b)
        print(f"request {i}, the GPU behind ({engine.lookahead_steps} steps ahead): {verdict}")
        ok &= same or dtype != "float32"
    return ok


async def answers(engine, batch: list, heard: list | None = None) -> list:
    """Each request's tokens (audio codes as a list, or the text), all sent at once; each one's samples
    (None for a text answer) appended to ``heard`` when given."""
    results = await asyncio.gather(*(engine.generate(request) for request in batch))
    if heard is not None:
        heard.extend(r.audio.samples if r.audio is not None else None for r in results)
    return [r.codes.codes.tolist() if r.codes is not None else r.text for r in results]


CODEC_TOLERANCE = 1e-2
"""How far the same codes' samples may be apart, graphed and eager, against their largest value (the
codec runs in float32 in both; its capture check allows as much)."""


def audio_apart(a, b) -> float:
    """The largest difference between two answers' samples against their largest value (inf when their
    lengths differ)."""
    if a is None or b is None or len(a) != len(b):
        return 0.0 if a is None and b is None else float("inf")
    scale = max(float(abs(a).max(initial=0.0)), 1e-6)
    return float(abs(a - b).max(initial=0.0)) / scale


def step_gpu(work) -> bool:
    """The steps' GPU time from their timing events (``EngineWork.step_gpu``): counted, and no more per
    step than the loop's own time per step (the events are on the GPU's clock, the loop's on the host's)."""
    from generation import STEP_GPU_WAITS

    steps = max(work.steps, 1)
    gpu, between = work.step_gpu["step"] / steps, work.step_gpu["between"] / steps
    loop = sum(work.scheduler[k] for k in ("launch", "wait", "tokens")) / steps
    print(f"GPU per step: {gpu * 1e3:.3f} ms running, {between * 1e3:.3f} ms waiting between steps; "
          f"the loop {loop * 1e3:.3f} ms per step")  # fmt: skip
    bounds = [f"<= {b * 1e3:g} ms" for b in STEP_GPU_WAITS] + [f"> {STEP_GPU_WAITS[-1] * 1e3:g} ms"]
    print("its waits between steps in a row: " + ", ".join(
        f"{bound} {n}" for bound, n in zip(bounds, work.step_gpu_waits, strict=True) if n
    ))  # fmt: skip
    return 0 < gpu <= 1.5 * loop


def ends_graphed(engine, answers: list) -> bool:
    """Every stream's last piece went through a codec graph (``Layout.end_frames``), but for a stream
    shorter than that length: the codec's own decode ran for no more calls than there are such streams."""
    end = engine._layout.end_frames
    short = sum(1 for a in answers if not isinstance(a, str) and len(a[0]) < end)
    eager = engine._pieces.eager_calls
    print(f"codec: the last pieces decoded at {end} frames; {eager} calls without a graph "
          f"({short} streams shorter than that)")  # fmt: skip
    work = engine.work()  # (the later pieces gathered for up to ``codec_gather``, ends with them)
    calls = ", ".join(f"{kind} {n}" for kind, n in work.codec_calls.items() if n)
    print(f"codec calls: {calls}; {work.codec_pieces} pieces; gather {engine.codec_gather * 1e3:g} ms")
    return end > 0 and eager <= short


def compared(a, b) -> tuple[bool, str]:
    """Whether two answers (text, or audio codes per codebook) are the same, and how they compare."""
    if a == b:
        return True, "same"
    if isinstance(b, str):
        return False, f"differs: {a!r} / {b!r}"
    frames = list(zip(*a, strict=True)), list(zip(*b, strict=True))
    agree = next((k for k, (x, y) in enumerate(zip(*frames, strict=False)) if x != y), len(frames[1]))
    return False, f"{len(frames[1])} frames, the same for {agree}, then differs"


def by_lengths(model: str, tokenizer: str, tmp, dtype: str, batch: list, masked: list) -> bool:
    """The engine with attention by each row's length in every length bucket (``HIGGS_ATTENTION_BY_LENGTHS``
    from 1 position: these requests are short; graphs on): its start-up check must pass (FlashAttention's
    variable-length kernel over the cache as laid out answers as the masked attention), and the batch's
    answers are compared with the masked engine's (in 16 bits "mostly the same": the two kernels round
    differently)."""
    import torch

    from engine import load_engine

    settings = service_settings(
        model, tokenizer, tmp / "voices", device="cuda", dtype=dtype, max_batch_size=8, warmup=False,
        attention_by_lengths=True, attention_by_lengths_from=1,
    )  # fmt: skip
    engine = load_engine(settings)
    try:
        on = engine._decoder.by_lengths_from is not None
        print(f"attention by each row's length: {'on' if on else 'OFF (the check failed: see the log)'}")
        if not on:
            return False
        got = asyncio.run(answers(engine, batch))
    finally:
        engine.close()
        del engine
        torch.cuda.empty_cache()
    for i, (a, b) in enumerate(zip(got, masked, strict=True)):
        print(f"request {i}, by lengths against masked: {compared(a, b)[1]}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    args = parser.parse_args()
    check_model_arguments(parser, args)
    with workspace() as tmp:
        model, tokenizer = models(args, tmp)
        import torch

        import generation
        from engine import load_engine

        device = args.device
        if device == "cuda" and not torch.cuda.is_available():
            print("no CUDA device: nothing to check")
            return 2
        dtype = "float32" if args.dtype == "auto" else args.dtype
        where = torch.cuda.get_device_name(0) if device == "cuda" else "the CPU (a dry run: no graphs)"
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {where}; {dtype}")
        batch = requests(generation)
        seen, ok, padded = {}, True, ()
        heard: dict[bool, list] = {True: [], False: []}
        for graphs in (True, False):
            # (the graphs two steps ahead, HIGGS_LOOKAHEAD_STEPS=2, against eager steps one ahead)
            settings = service_settings(
                model, tokenizer, tmp / "voices", device=device, dtype=dtype, cuda_graphs=graphs,
                max_batch_size=8, warmup=False, attention_by_lengths=False,
                lookahead_steps=2 if graphs else 1,
            )  # fmt: skip
            started = time.perf_counter()
            engine = load_engine(settings)
            loaded = time.perf_counter() - started
            try:
                if graphs and device == "cuda":
                    step, codec = engine._decoder, engine._pieces
                    failed = sorted(step._graph_failed) or "none"
                    print(f"loaded in {loaded:.1f} s: {len(step._graphs)} step graphs, "
                          f"{len(codec._graphs)} codec graphs; step shapes failed: {failed}, codec shapes "
                          f"failed: {sorted(codec.failed) or 'none'}")  # fmt: skip
                    ok &= bool(step._graphs) and not step._graph_failed
                    ok &= bool(codec._graphs) and not codec.failed
                    ok &= prefill_beside_steps(engine, generation)
                    ok &= prefill_graphs(engine, generation)
                if graphs:
                    padded = engine._decoder.prefiller.padded_lengths
                else:
                    ok &= own_prefill(engine, generation, dtype)
                    # Prompts padded as the graphed engine pads them (its prefill graphs' lengths): in
                    # float32 its answers must be the same, and an unpadded fill rounds otherwise.
                    engine._decoder.prefiller.padded_lengths = padded
                started = time.perf_counter()
                seen[graphs] = asyncio.run(answers(engine, batch, heard[graphs]))
                print(f"{'graphs' if graphs else 'eager '}: {len(batch)} requests at once in "
                      f"{time.perf_counter() - started:.2f} s")  # fmt: skip
                if device == "cuda":
                    ok &= step_gpu(engine.work())
                if graphs and device == "cuda":
                    ok &= ends_graphed(engine, seen[graphs])
                    ok &= gpu_behind(engine, batch, seen[graphs], dtype)
            finally:
                engine.close()
                step = codec = None  # (the first engine's decoder and codec held for the second's load)
                del engine
                if device == "cuda":
                    torch.cuda.empty_cache()
        for i, (with_graphs, eager) in enumerate(zip(seen[True], seen[False], strict=True)):
            same, verdict = compared(with_graphs, eager)
            if same and not isinstance(eager, str):  # the codec's graphs against its eager decode_part
                apart = audio_apart(heard[True][i], heard[False][i])
                verdict += f", samples within {apart:.1e} of the largest"
                ok &= apart <= CODEC_TOLERANCE
            print(f"request {i} ({'text' if isinstance(eager, str) else 'audio'}): {verdict}")
            ok &= same or dtype != "float32"
        if device == "cuda" and dtype != "float32":
            ok &= by_lengths(model, tokenizer, tmp, dtype, batch, seen[True])
        print("OK" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
