"""Latency of a voice-cloned chat completion against the same request without a reference, through HTTP.

Run:  .venv/bin/python bench/bench_clone.py [--repeats 7] [--max-tokens 64] [--threads N]

The service (``create_app``, the tiny random-weight Higgs models of ``tests/tiny_models.py`` on the CPU in
float32, speech recognition off) is served for real by uvicorn on 127.0.0.1 in a background thread; the
app's lifespan loads and warms up its engine. Three kinds of ``/v1/chat/completions`` request, each with
``modalities: ["text", "audio"]``, WAV output and the same text, ``seed`` and ``max_tokens`` (the tiny
model's audio never ends by itself, so every one decodes exactly ``max_tokens`` steps; checked):

* **no reference**: ``audio.voice = "default"`` (``--baseline-voice``), the text alone;
* **clone, cache miss**: ``audio.voice = "clone"``, the text plus ``test_audio.wav`` (repo root) as a
  base64 ``input_audio`` with its transcript in ``input_audio.transcript``; every request's clip has one
  different sample (one step of 16-bit PCM, mid-clip), so its content hash is new and the reference is
  tokenized again (checked: exactly one ``engine.encode`` call);
* **clone, cache hit**: the unmodified clip each time (primed once before timing; checked: no encode).

Requests are sequential, interleaved (the order rotates every repeat), and timed on the client from
sending to having read the whole response; the engine's ``encode`` and ``generate`` are wrapped to time
the reference tokenization and the generation inside each request. Printed: medians (min-max) side by
side, the ratios clone/no-reference, and the share of a cache-miss request spent tokenizing the
reference (from the timed ``encode``, and from miss minus hit).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import ROOT, Stopwatch, conditions, serve, service_settings, spread, workspace, write_tiny_models

CLIP = ROOT / "test_audio.wav"
TEXT = "Say this in my voice: the quick brown fox jumps over the lazy dog."
KINDS = ("no reference", "clone, cache miss", "clone, cache hit")


@dataclass
class Timings:
    """Per-request timings of one kind of request."""

    total: list[float] = field(default_factory=list)
    encode: list[float] = field(default_factory=list)
    generate: list[float] = field(default_factory=list)
    prompt_tokens: int = 0


def altered_clips(count: int) -> list[str]:
    """``count`` base64 WAVs of the test clip, each with a different single sample moved by one step."""
    import soundfile as sf

    samples, rate = sf.read(str(CLIP), dtype="int16")
    clips = []
    for i in range(count):
        altered = samples.copy()
        at = len(altered) // 2 + i
        altered[at] = altered[at] + 1 if altered[at] < 32767 else altered[at] - 1
        buf = io.BytesIO()
        sf.write(buf, altered, rate, format="WAV", subtype="PCM_16")
        clips.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return clips


def main() -> None:
    """Run the benchmark and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed requests of each kind (median)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    parser.add_argument("--baseline-voice", default="default", help="audio.voice of the no-reference request")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    with workspace() as tmp:
        run(args, write_tiny_models(tmp), tmp / "voices")


def run(args: argparse.Namespace, tiny: dict[str, str], voices_dir: Path) -> None:
    import httpx
    import torch

    from app import create_app
    from voice_cloning import load_reference

    torch.set_num_threads(args.threads)
    settings = service_settings(tiny["HIGGS_MODEL"], tiny["HIGGS_AUDIO_TOKENIZER"], voices_dir)
    transcripts = json.loads((ROOT / "tests" / "fixtures" / "transcripts.json").read_text())
    transcript = transcripts[CLIP.name]
    hit_clip = base64.b64encode(CLIP.read_bytes()).decode("ascii")
    miss_clips = altered_clips(args.repeats + 1)

    def body(voice: str, clip: str | None) -> dict[str, Any]:
        content: Any = TEXT
        if clip is not None:
            reference = {"data": clip, "format": "wav", "transcript": transcript}
            content = [{"type": "text", "text": TEXT}, {"type": "input_audio", "input_audio": reference}]
        return {
            "model": settings.served_model_name,
            "modalities": ["text", "audio"],
            "audio": {"voice": voice, "format": "wav"},
            "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens,
            "seed": args.seed,
        }

    app = create_app(settings)
    with serve(app) as url, httpx.Client(base_url=url, timeout=600) as client:
        engine = app.state.engine  # the app's own engine, loaded and warmed up by its lifespan
        encode, generate = Stopwatch(), Stopwatch()
        encode.wrap(engine, "encode")
        generate.wrap(engine, "generate")
        timings = {kind: Timings() for kind in KINDS}
        expected = {KINDS[0]: (args.baseline_voice, 0), KINDS[1]: ("clone", 1), KINDS[2]: ("clone", 0)}

        def request(kind: str, clip: str | None) -> None:
            voice, encodes = expected[kind]
            encode.take()
            generate.take()
            started = time.perf_counter()
            response = client.post("/v1/chat/completions", json=body("clone" if clip else voice, clip))
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            usage = response.json()["usage"]
            assert usage["completion_tokens"] == args.max_tokens, usage
            assert response.headers["x-voice"] == voice, (kind, response.headers["x-voice"])
            assert "x-voice-fallback" not in response.headers, response.headers["x-voice-fallback"]
            encode_seconds, encode_calls = encode.take()
            assert encode_calls == encodes, f"{kind}: {encode_calls} encode calls, expected {encodes}"
            t = timings[kind]
            t.total.append(elapsed)
            t.encode.append(encode_seconds)
            t.generate.append(generate.take()[0])
            t.prompt_tokens = usage["prompt_tokens"]

        # Untimed: one of each (the hit's reference is encoded and cached here).
        senders: dict[str, Callable[[int], None]] = {
            KINDS[0]: lambda i: request(KINDS[0], None),
            KINDS[1]: lambda i: request(KINDS[1], miss_clips[i]),
            KINDS[2]: lambda i: request(KINDS[2], hit_clip),
        }
        request(KINDS[1], hit_clip)  # primes the cache with the hit's clip (a miss, once)
        senders[KINDS[0]](0)
        senders[KINDS[1]](args.repeats)
        senders[KINDS[2]](0)
        for t in timings.values():
            t.total.clear()
            t.encode.clear()
            t.generate.clear()

        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        for rep in range(args.repeats):
            order = KINDS[rep % 3 :] + KINDS[: rep % 3]
            for kind in order:
                senders[kind](rep)
        elapsed = time.perf_counter() - started

        limits = app.state.planner.limits
        validation = []
        for clip in miss_clips[:3]:
            t0 = time.perf_counter()
            load_reference(clip, "wav", transcript, limits, "bench")
            validation.append(time.perf_counter() - t0)

    torch_threads = torch.get_num_threads()
    median = statistics.median
    noref, miss, hit = (timings[k] for k in KINDS)
    print(f"tiny Higgs models (random weights), cpu float32, {torch_threads} torch threads; STT off")
    print(
        f"reference: {CLIP.name} ({len(base64.b64decode(hit_clip)) / 1e3:.0f} kB WAV, transcript given); "
        f"text {len(TEXT)} characters; max_tokens {args.max_tokens} (all decoded); seed {args.seed}"
    )
    print(
        f"prompt tokens: no reference {noref.prompt_tokens}, clone {miss.prompt_tokens}; "
        f"checked: exactly 1 encode per miss, none per hit or no-reference request"
    )
    print(
        f"{args.repeats} interleaved repeats of each kind ({conditions(elapsed, load_before)}); "
        "medians (min-max)"
    )
    print()
    width = 20
    print(f"{'':<{width}} {'whole request':>26} {'in engine.generate':>26} {'in engine.encode':>26}")
    for kind in KINDS:
        t = timings[kind]
        print(f"{kind:<{width}} {spread(t.total):>26} {spread(t.generate):>26} {spread(t.encode):>26}")
    print()
    print(
        f"reference validation (base64, WAV decode, speech check, trim, hash), timed outside the server: "
        f"{median(validation) * 1e3:.1f} ms"
    )
    for kind, t in ((KINDS[1], miss), (KINDS[2], hit)):
        print(f"ratio {kind} / no reference: {median(t.total) / median(noref.total):6.3f}x")
    share = median(miss.encode) / median(miss.total)
    difference = (median(miss.total) - median(hit.total)) / median(miss.total)
    print(
        f"share of a cache-miss clone request spent tokenizing the reference: {share:6.1%} "
        f"(timed encode); {difference:6.1%} (miss - hit)"
    )


if __name__ == "__main__":
    main()
