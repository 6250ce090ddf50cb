"""Long texts: time to first audio, total time and peak memory for 100, 1,000 and 4,000 characters.

Run:  .venv/bin/python bench/bench_longform.py [--repeats 3] [--piece-seconds 1.0]
      .venv/bin/python bench/bench_longform.py --model bosonai/higgs-audio-v2-generation-3B-base \\
          --audio-tokenizer bosonai/higgs-audio-v2-tokenizer --device cuda --piece-seconds 60

The service (``create_app``, speech recognition off, an empty voice library in a temporary folder) is
served for real by uvicorn on 127.0.0.1 in a background thread. By default it runs the tiny random-weight
models of ``tests/tiny_models.py`` on the CPU: their absolute times mean nothing, only the ratios between
the three lengths do. The tiny model never ends a piece by itself, so every piece runs to its cap, which
``--piece-seconds`` (``max_audio_seconds``) keeps small; the audio then grows with the number of pieces, as
real speech grows with the text. With real weights each piece ends where its speech ends.

For each length, in rotating order after one untimed round:

* **streamed speech**: ``/v1/audio/speech``, ``response_format: "pcm"``. Time to first audio: the first body
  bytes; total: the end of the body. Also the decoding steps the engine had run when the first bytes
  arrived (counted from the request's start; a measure that the machine's load does not blur).
* **whole chat**: ``/v1/chat/completions`` with ``stream: false`` and a wav answer: total time, and the peak
  memory the request added (the process's resident memory above its level before, from ``VmHWM`` after
  resetting it; on CUDA also ``torch.cuda.max_memory_allocated`` above the memory allocated before).

Printed: medians (min-max), and the ratios of each length to the 100-character text.

Then **under load** (``--load-rounds``, 0 to skip): a second service with ``--load-slots`` slots, kept full
by ``--load-clients`` other clients, each asking back to back for ``--load-tokens`` tokens of text (a text
answer holds a slot without the codec's work, so that on a CPU too the requests wait for slots, not for the
codec), streams the 1,000-character text. Rounds alternate between the engine as it is (each piece keeps its
slot for the next: ``keep_slot``; with pieces under 1.3 s of audio, as by default here, the listener never
has ``longform.KEEP_SLOT_LEAD`` in hand before the 4th piece) and the same engine with
``engine.HOLD_SECONDS`` and ``engine.HOLD_WHILE_DECODING`` at 0 (no slot kept: the next piece waits in the
line, at its head, for a slot to free). Printed: how long the text's later pieces waited for a slot
(``queue_seconds`` of their results: the silence a listener hears at a join once the audio already
received has played, when generation is not far ahead), the longest silence between two chunks of the long
text's body, its total time, and the ratios.
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    conditions,
    run_script,
    serve,
    service_settings,
    spread,
)

LENGTHS = (100, 1000, 4000)


def text_of(length: int) -> str:
    """About ``length`` characters of sentences (cut at a word, ending with a full stop)."""
    from sample_texts import sentences  # tests/, on the path inside ``workspace()``

    text = sentences(length // 40 + 2)
    return text[: text.rfind(" ", 0, length)].rstrip(",;") + "."


@dataclass
class Column:
    """The timed requests of one length."""

    first: list[float] = field(default_factory=list)
    first_steps: list[int] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    whole: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    cuda: list[float] = field(default_factory=list)
    audio_seconds: float = 0.0
    pieces: int = 0


def _status_bytes(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(name)


def main() -> None:
    """Run the benchmark and print the comparison."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed requests of each kind and length")
    parser.add_argument("--piece-seconds", type=float, default=1.0, help="cap on each piece's audio")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--load-rounds", type=int, default=2, help="rounds of each kind under load")
    parser.add_argument("--load-slots", type=int, default=2, help="slots of the service under load")
    parser.add_argument("--load-clients", type=int, default=3, help="other clients under load")
    parser.add_argument("--load-tokens", type=int, default=100, help="tokens of each other request")
    run_script(parser, run)


def run(args: argparse.Namespace, model: str, audio_tokenizer: str, voices_dir: Path) -> None:
    import httpx
    import torch

    from app import create_app
    from text_split import split_text

    settings = service_settings(
        model,
        audio_tokenizer,
        voices_dir,
        device=args.device,
        dtype=args.dtype,
        max_audio_seconds=args.piece_seconds,
        generation_timeout_seconds=3600,
    )
    texts = {n: text_of(n) for n in LENGTHS}
    columns = {n: Column() for n in LENGTHS}
    cuda = args.device == "cuda"
    app = create_app(settings)
    load_before, started = os.getloadavg()[0], time.perf_counter()
    with serve(app, start_timeout=1800) as url, httpx.Client(base_url=url, timeout=3600) as client:
        engine = app.state.engine

        def speech(n: int) -> tuple[float, int, float, float]:
            body = {"model": "tts-1", "input": texts[n], "voice": "default", "response_format": "pcm",
                    "seed": args.seed}  # fmt: skip
            steps, size, first, first_steps = engine.steps, 0, None, 0
            t0 = time.perf_counter()
            with client.stream("POST", "/v1/audio/speech", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"speech: {response.status_code} {response.read()!r}")
                for chunk in response.iter_bytes():
                    if first is None and chunk:
                        first, first_steps = time.perf_counter() - t0, engine.steps - steps
                    size += len(chunk)
            return first or 0.0, first_steps, time.perf_counter() - t0, size / 2 / engine.sample_rate

        def whole(n: int) -> tuple[float, float, float]:
            body = {"model": "gpt-4o-audio-preview", "modalities": ["text", "audio"],
                    "audio": {"voice": "default", "format": "wav"},
                    "messages": [{"role": "user", "content": texts[n]}], "seed": args.seed}  # fmt: skip
            rss = _status_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                allocated = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            response = client.post("/v1/chat/completions", json=body)
            total = time.perf_counter() - t0
            if response.status_code != 200:
                raise RuntimeError(f"chat: {response.status_code} {response.text[:200]}")
            base64.b64decode(response.json()["choices"][0]["message"]["audio"]["data"])
            peak_cuda = (torch.cuda.max_memory_allocated() - allocated) / 2**20 if cuda else 0.0
            return total, (_status_bytes("VmHWM") - rss) / 2**20, peak_cuda

        for n in LENGTHS:  # untimed round: the first request of a kind allocates what later ones reuse
            speech(n)
            whole(n)
        for repeat in range(args.repeats):
            order = LENGTHS[repeat % 3 :] + LENGTHS[: repeat % 3]
            for n in order:
                first, first_steps, total, audio_seconds = speech(n)
                whole_total, rss, peak_cuda = whole(n)
                column = columns[n]
                column.first.append(first)
                column.first_steps.append(first_steps)
                column.total.append(total)
                column.whole.append(whole_total)
                column.rss.append(rss)
                column.cuda.append(peak_cuda)
                column.audio_seconds = audio_seconds
        for n in LENGTHS:
            columns[n].pieces = len(split_text(texts[n], settings.piece_characters))
    loaded = _under_load(args, settings, texts[1000]) if args.load_rounds > 0 else None

    base = columns[LENGTHS[0]]
    median = statistics.median
    print(f"{'tiny models on the CPU' if args.model is None else model} ({args.device}); "
          f"pieces of at most {settings.piece_characters} characters, each capped at {args.piece_seconds} s "
          f"of audio; {settings.context_pieces} pieces of context; {args.repeats} repeats")  # fmt: skip
    print(f"run: {conditions(time.perf_counter() - started, load_before)}")

    def ratio(values: list[float], base_values: list[float]) -> str:
        return f"x{median(values) / median(base_values):.2f}"

    for n in LENGTHS:
        c = columns[n]
        print(f"\n{len(texts[n])} characters: {c.pieces} pieces, {c.audio_seconds:.1f} s of audio")
        print(
            f"  streamed speech, first audio  {spread(c.first)}   {ratio(c.first, base.first)}   "
            f"steps to first audio {median(c.first_steps):.0f} ({ratio(c.first_steps, base.first_steps)})"
        )
        print(f"  streamed speech, total        {spread(c.total)}   {ratio(c.total, base.total)}")
        print(f"  whole chat (wav), total       {spread(c.whole)}   {ratio(c.whole, base.whole)}")
        print(f"  whole chat, peak RSS added    {spread(c.rss, ' MiB')}")
        if cuda:
            print(f"  whole chat, peak CUDA added   {spread(c.cuda, ' MiB')}")
    if loaded is not None:
        kept, given = loaded["kept"], loaded["given"]
        print(
            f"\nunder load ({args.load_slots} slots kept full by {args.load_clients} other clients), "
            f"{len(texts[1000])} characters streamed, {args.load_rounds} rounds each, alternated:"
        )
        for name, label in (("wait", "piece's wait"), ("silence", "longest silence"), ("total", "total")):
            times = median(given[name]) / median(kept[name]) if median(kept[name]) > 0 else math.inf
            print(
                f"  {label:<16} slot kept {spread(kept[name])}   given to the line {spread(given[name])}   "
                f"x{times:.2f}"
            )


def _under_load(args: argparse.Namespace, settings, text: str) -> dict[str, dict[str, list[float]]]:
    """The long text streamed while other clients keep every slot busy, with and without kept slots."""
    import threading

    import httpx

    import engine as engine_module
    import generation
    from app import create_app

    holds = engine_module.HOLD_SECONDS, engine_module.HOLD_WHILE_DECODING
    loaded = settings.model_copy(update={"max_batch_size": args.load_slots})
    app = create_app(loaded)
    found = {k: {"wait": [], "silence": [], "total": []} for k in ("kept", "given")}
    with serve(app, start_timeout=1800) as url:
        stop = threading.Event()
        engine, waits = app.state.engine, []
        stream = engine.stream

        async def recorded(request):  # the later pieces' waits for a slot
            async for event in stream(request):
                if isinstance(event, generation.GenerationResult) and request.continues:
                    waits.append(event.queue_seconds)
                yield event

        engine.stream = recorded

        def other(i: int) -> None:
            # Text answers: they hold a slot for their tokens without the codec's work, so that on a CPU too
            # the slots, not the codec, are what the requests wait for.
            body = {"model": "gpt-4o-audio-preview", "modalities": ["text"], "max_tokens": args.load_tokens,
                    "messages": [{"role": "user", "content": f"Another client, number {i}."}]}  # fmt: skip
            with httpx.Client(base_url=url, timeout=600) as client:
                while not stop.is_set():
                    client.post("/v1/chat/completions", json=body)

        def long_text() -> tuple[float, float]:
            body = {"model": "tts-1", "input": text, "voice": "default", "response_format": "pcm",
                    "seed": args.seed}  # fmt: skip
            arrivals = []
            t0 = time.perf_counter()
            with httpx.Client(base_url=url, timeout=3600) as client:
                with client.stream("POST", "/v1/audio/speech", json=body) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"speech: {response.status_code} {response.read()!r}")
                    for chunk in response.iter_bytes():
                        if chunk:
                            arrivals.append(time.perf_counter())
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
            return max(gaps, default=0.0), time.perf_counter() - t0

        others = [threading.Thread(target=other, args=(i,)) for i in range(args.load_clients)]
        for thread in others:
            thread.start()
        try:
            time.sleep(1.0)  # the slots fill
            for round_ in range(2 * args.load_rounds):
                kind = ("kept", "given")[round_ % 2]
                kept = kind == "kept"
                engine_module.HOLD_SECONDS, engine_module.HOLD_WHILE_DECODING = holds if kept else (0.0, 0.0)
                waits.clear()
                silence, total = long_text()
                found[kind]["wait"].extend(waits)
                found[kind]["silence"].append(silence)
                found[kind]["total"].append(total)
        finally:
            engine_module.HOLD_SECONDS, engine_module.HOLD_WHILE_DECODING = holds
            stop.set()
            for thread in others:
                thread.join()
    return found


if __name__ == "__main__":
    main()
