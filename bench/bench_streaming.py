"""Time to first audio and real-time factor of streamed speech against the same request answered whole.

Run:  .venv/bin/python bench/bench_streaming.py [--repeats 7] [--max-tokens 150] [--threads N]
      .venv/bin/python bench/bench_streaming.py --model bosonai/higgs-audio-v2-generation-3B-base \\
          --audio-tokenizer bosonai/higgs-audio-v2-tokenizer --device cuda --max-tokens 400

The service (``create_app``, speech recognition off, an empty voice library in a temporary folder) is
served for real by uvicorn on 127.0.0.1 in a background thread; the app's lifespan loads and warms up its
engine. By default that engine runs the tiny random-weight Higgs models of ``tests/tiny_models.py`` (written
to a temporary folder) on the CPU in float32. **With the tiny models the absolute times mean nothing** (a
two-layer model with random weights on a CPU says nothing about a 3B model on a GPU); only the ratios do,
and even they mostly reflect where the first audio piece falls in the decoding loop. With real weights
(``--model``, ``--audio-tokenizer``, ``--device cuda``) the absolute time to first audio and the real-time
factor are the numbers to read.

Three ways of asking for the same speech (same text, ``seed``, voice ``default``, output cap), each timed
on the client from sending the request:

* **streamed chat**: ``/v1/chat/completions`` with ``stream: true``, ``modalities: ["text", "audio"]``,
  ``audio: {voice: "default", format: "pcm16"}`` and ``max_tokens``; read as server-sent events. Time to
  first audio: the first event whose ``delta.audio.data`` is not empty; total: the ``[DONE]`` event.
* **streamed speech**: ``/v1/audio/speech`` with ``response_format: "pcm"`` and ``seed``. Time to first
  audio: the first body bytes; total: the end of the body. The speech endpoint takes no ``max_tokens``; its
  cap is 4 s plus ``seconds_per_character`` per character, bounded by ``max_audio_seconds``, so this
  benchmark sets ``max_audio_seconds`` to make that cap exactly ``--max-tokens`` (checked).
* **whole chat**: the streamed chat's request with ``stream: false``; time to first audio = total.

The tiny model's audio stream never ends by itself, so every request decodes exactly ``--max-tokens`` steps
(checked through the engine's step counter; real weights stop when the speech ends, at the same step on
every path since the prompt and seed are the same). Requests are sequential, interleaved (the order rotates
every repeat), after one untimed request of each kind. Printed: medians (min-max), the audio seconds each
request produced, the real-time factor (client seconds to the end of the answer / audio seconds; below 1 is
faster than real time), the ratios time to first audio / total of each streamed path and each streamed
path's time to first audio / the whole chat's total, and the time spent in the audio codec's ``decode``
(wrapped on the engine; the streamed paths decode each piece with a few frames of context again). The
answers' audio is compared too: the two streamed paths run the same incremental decoder, the whole answer
one decode at the end.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    Stopwatch,
    conditions,
    run_script,
    serve,
    service_settings,
    speech_cap_settings,
    spread,
)

TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."
KINDS = ("streamed chat (SSE)", "streamed speech (pcm)", "whole chat (stream false)")


@dataclass
class Answer:
    """One request's timings, audio and decoding steps."""

    first: float
    total: float
    pcm: bytes
    steps: int
    codec: float = 0.0
    codec_calls: int = 0
    first_decode_step: int = 0


@dataclass
class Timings:
    """The timed answers of one kind of request."""

    first: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    audio_seconds: list[float] = field(default_factory=list)
    codec: list[float] = field(default_factory=list)
    steps: set[int] = field(default_factory=set)
    codec_calls: set[int] = field(default_factory=set)
    first_decode_step: set[int] = field(default_factory=set)

    def add(self, answer: Answer, sample_rate: int) -> None:
        self.first.append(answer.first)
        self.total.append(answer.total)
        self.audio_seconds.append(len(answer.pcm) / 2 / sample_rate)
        self.codec.append(answer.codec)
        self.steps.add(answer.steps)
        self.codec_calls.add(answer.codec_calls)
        self.first_decode_step.add(answer.first_decode_step)

    @property
    def rtf(self) -> list[float]:
        return [t / a for t, a in zip(self.total, self.audio_seconds, strict=True)]


class CodecTimer:
    """Wraps the engine's audio codec ``decode`` (run on its worker) to time it; requests are sequential.

    Also notes the engine's decoding step count at the first decode since the last ``take``. The step
    counter ticks in the stopping criterion, after the streamer saw the step's output, so in a streamed
    request the first piece is decoded during step ``first_step + 1``.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.watch = Stopwatch()
        self.base = self.first_step = 0
        self.watch.wrap(engine.higgs.codec, "decode", before=self._note_first_step)

    def _note_first_step(self) -> None:
        if self.watch.calls == 0:
            self.first_step = self.engine.steps - self.base

    def take(self) -> tuple[float, int, int]:
        """Seconds, calls and the first decode's step since the last ``take``; resets."""
        taken = (*self.watch.take(), self.first_step)
        self.base, self.first_step = self.engine.steps, 0
        return taken


def as_float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32767.0


def compare(a: bytes, b: bytes) -> str:
    """How close two 16-bit PCM answers are."""
    if len(a) != len(b):
        return f"lengths differ ({len(a) // 2} vs {len(b) // 2} samples)"
    if a == b:
        return "identical bytes"
    x, y = as_float(a), as_float(b)
    diff = int(np.abs(np.frombuffer(a, "<i2").astype(np.int32) - np.frombuffer(b, "<i2")).max())
    rms = float(np.sqrt(np.mean(np.square(x - y))) / max(np.sqrt(np.mean(np.square(y))), 1e-12))
    corr = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
    return f"same length, correlation {corr:.4f}, rms difference {rms:.1%} of the signal, max {diff} LSB"


def main() -> None:
    """Run the benchmark and print the comparison."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed requests of each kind (median)")
    parser.add_argument(
        "--max-tokens", type=int, default=150, help="output cap of every request (decoding steps; > 9)"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--text", default=TEXT, help="what every request speaks")

    def check(args: argparse.Namespace) -> str | None:
        if args.max_tokens <= 9 or args.repeats < 1:
            return "--max-tokens must exceed 9 and --repeats be positive"
        return None

    run_script(parser, run, check)


def run(args: argparse.Namespace, model: str, audio_tokenizer: str, voices_dir: Path) -> None:
    import httpx
    import torch

    from app import create_app

    tiny = args.model is None
    settings = service_settings(
        model,
        audio_tokenizer,
        voices_dir,
        device=args.device,
        dtype=args.dtype,
        **speech_cap_settings(args.max_tokens),  # checked below through the planner's cap
    )
    chat = {
        "model": settings.served_model_name,
        "modalities": ["text", "audio"],
        "audio": {"voice": "default", "format": "pcm16"},
        "messages": [{"role": "user", "content": args.text}],
        "max_tokens": args.max_tokens,
        "seed": args.seed,
    }
    speech = {
        "model": "tts-1",
        "input": args.text,
        "voice": "default",
        "response_format": "pcm",
        "seed": args.seed,
    }

    app = create_app(settings)
    with serve(app, start_timeout=1800) as url, httpx.Client(base_url=url, timeout=1800) as client:
        engine = app.state.engine  # the app's own engine, loaded and warmed up by its lifespan
        rate = engine.sample_rate
        cap = app.state.planner.audio_token_cap(args.text)
        if cap != args.max_tokens:
            raise RuntimeError(
                f"the speech endpoint's cap is {cap} tokens, not --max-tokens {args.max_tokens}"
            )
        worker_threads = torch.get_num_threads()  # intra-op threads are per process
        codec = CodecTimer(engine)

        def timed(send: Callable[[], Answer]) -> Answer:
            """Run one request; the codec time it caused is read after the answer is complete."""
            codec.take()
            answer = send()
            answer.codec, answer.codec_calls, answer.first_decode_step = codec.take()
            return answer

        def streamed_chat() -> Answer:
            pieces: list[bytes] = []
            first = done = None
            steps = engine.steps
            started = time.perf_counter()
            with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"streamed chat: {response.status_code} {response.read()!r}")
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        done = time.perf_counter() - started
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise RuntimeError(f"streamed chat failed: {event['error']}")
                    for choice in event.get("choices", []):
                        audio = (choice.get("delta") or {}).get("audio") or {}
                        if audio.get("data"):
                            if first is None:
                                first = time.perf_counter() - started
                            pieces.append(base64.b64decode(audio["data"]))
            if first is None or done is None:
                raise RuntimeError("streamed chat: no audio, or no [DONE]")
            return Answer(first, done, b"".join(pieces), engine.steps - steps)

        def streamed_speech() -> Answer:
            pieces: list[bytes] = []
            first = None
            steps = engine.steps
            started = time.perf_counter()
            with client.stream("POST", "/v1/audio/speech", json=speech) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"streamed speech: {response.status_code} {response.read()!r}")
                for piece in response.iter_raw():
                    if piece:
                        if first is None:
                            first = time.perf_counter() - started
                        pieces.append(piece)
            total = time.perf_counter() - started
            if first is None:
                raise RuntimeError("streamed speech: an empty body")
            return Answer(first, total, b"".join(pieces), engine.steps - steps)

        def whole_chat() -> Answer:
            steps = engine.steps
            started = time.perf_counter()
            response = client.post("/v1/chat/completions", json={**chat, "stream": False})
            total = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"whole chat: {response.status_code} {response.text}")
            pcm = base64.b64decode(response.json()["choices"][0]["message"]["audio"]["data"])
            return Answer(total, total, pcm, engine.steps - steps)

        senders: dict[str, Callable[[], Answer]] = dict(
            zip(KINDS, (streamed_chat, streamed_speech, whole_chat), strict=True)
        )
        # Untimed: one of each (warms up the HTTP paths); their audio is what the timed ones must repeat.
        reference = {kind: timed(send) for kind, send in senders.items()}
        timings = {kind: Timings() for kind in KINDS}
        repeatable = dict.fromkeys(KINDS, True)

        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        for rep in range(args.repeats):
            for kind in KINDS[rep % 3 :] + KINDS[: rep % 3]:
                answer = timed(senders[kind])
                timings[kind].add(answer, rate)
                repeatable[kind] &= answer.pcm == reference[kind].pcm
        elapsed = time.perf_counter() - started
        dtype = engine.higgs.model.dtype

    steps = sorted(set().union(*(t.steps for t in timings.values())))
    if tiny and steps != [args.max_tokens]:
        raise RuntimeError(f"decoding steps per request {steps}, expected exactly {args.max_tokens}")
    s = engine.streaming
    # A frame is complete num_codebooks - 1 columns later (the delay pattern); the first column is a marker.
    expected_step = s.first_piece_frames + engine.num_codebooks
    first_steps = sorted({n + 1 for k in KINDS[:2] for n in timings[k].first_decode_step})
    first_step = max(first_steps)
    median = statistics.median

    if tiny:
        print(
            f"tiny Higgs models (random weights), {args.device} {str(dtype).removeprefix('torch.')}: "
            "absolute times mean nothing, only the ratios do"
        )
    else:
        print(f"{args.model} + {args.audio_tokenizer}, {args.device} {str(dtype).removeprefix('torch.')}")
    print(
        f"torch threads {worker_threads} (engine worker); STT off; text {len(args.text)} characters; voice "
        f"default; seed {args.seed}; max_tokens {args.max_tokens} (speech: the same cap, checked)"
    )
    print(
        f"decoding steps per request: {', '.join(map(str, steps))} (all paths); streaming pieces of "
        f"{s.chunk_frames} frames (the first {s.first_chunk_frames}) with {s.context_frames} held back "
        f"and a {s.crossfade_ms:g} ms crossfade: "
        f"the first piece is decoded in step {'/'.join(map(str, first_steps))} (expected "
        f"{expected_step}), {first_step / max(steps):.0%} of {max(steps)}"
    )
    streamed, spoken, whole = (reference[k].pcm for k in KINDS)
    print(f"audio, streamed chat vs streamed speech: {compare(streamed, spoken)}")
    print(f"audio, streamed chat vs whole chat: {compare(streamed, whole)}")
    print(
        "same audio on every repeat (same seed): "
        + ", ".join(f"{k.split(' (')[0]} {'yes' if repeatable[k] else 'NO'}" for k in KINDS)
    )
    print(
        f"{args.repeats} interleaved repeats of each kind ({conditions(elapsed, load_before)}); "
        "medians (min-max)"
    )
    print()
    width = 26
    wide = functools.partial(spread, width=8)  # medians (min-max), a character wider
    print(
        f"{'':<{width}} {'time to first audio':>27} {'total':>27} {'audio':>9} {'real-time factor':>27} "
        f"{'in codec decode (calls)':>34}"
    )
    for kind in KINDS:
        t = timings[kind]
        calls = "/".join(map(str, sorted(t.codec_calls)))
        print(
            f"{kind:<{width}} {wide(t.first):>27} {wide(t.total):>27} "
            f"{median(t.audio_seconds):7.2f} s {wide(t.rtf, ''):>27} {wide(t.codec) + f' ({calls})':>34}"
        )
    print()
    whole_total = median(timings[KINDS[2]].total)
    for kind in KINDS[:2]:
        t = timings[kind]
        name = kind.split(" (")[0]
        print(f"{name}: time to first audio / total {median(t.first) / median(t.total):6.3f}")
        print(f"{name}: time to first audio / whole chat total {median(t.first) / whole_total:6.3f}")
        print(f"{name}: total / whole chat total {median(t.total) / whole_total:6.3f}")
    if not tiny:
        print()
        for kind in KINDS:
            t = timings[kind]
            print(
                f"{kind}: time to first audio {median(t.first) * 1e3:.0f} ms, real-time factor "
                f"{median(t.rtf):.3f} ({median(t.audio_seconds) / median(t.total):.2f}x real time)"
            )


if __name__ == "__main__":
    main()
