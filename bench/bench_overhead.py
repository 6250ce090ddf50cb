"""Per-decoding-step cost of the service through HTTP against the bare upstream Higgs Audio engine.

Run:  .venv/bin/python bench/bench_overhead.py [--repeats 5] [--lengths 64 256] [--threads N]
          [--voice alloy] [--slots 1] [--device cpu|cuda] [--dtype float32|bfloat16]

Both contenders run in this one process, on the same tiny random-weight Higgs models
(``tests/tiny_models.py``, written to a temporary folder), by default on the CPU in float32, with the same
number of torch threads:

* **service**: ``create_app(settings)`` served for real by uvicorn on 127.0.0.1 (a free port, a background
  thread); the app's lifespan loads and warms up its own engine, with ``--slots`` rows (default 1, the
  batch upstream decodes: on the CPU every slot is computed at every step, ``decoder.py``). Each request
  is an httpx POST to ``/v1/chat/completions`` with ``modalities: ["text", "audio"]``, ``audio: {voice:
  "alloy", format: "wav"}``, an explicit ``max_tokens``, ``seed`` and ``temperature: 0`` (greedy); it is
  timed on the client from sending the request to having read the whole response.
* **upstream**: ``boson_multimodal``'s ``HiggsAudioServeEngine.generate`` called directly with a
  ``ChatMLSample``, ``force_audio_gen=True``, the same seed, ``max_new_tokens`` and sampling settings
  (temperature 0, the service's top-p and top-k, no RAS window on either side: its redraws are random
  draws, each side's own) and upstream's default stop strings. The
  sample mirrors the prompt the service built for the voice (read from the engine's first request): the
  system prompt with the default scene and the user text; and when the voice is a stored one (a voice
  reference: its transcript, then the clip from the voice library's ``NAME.wav`` as an ``AudioContent``,
  which upstream encodes on every call, having no cache).

The tiny model's audio stream never ends by itself, so both sides decode exactly ``max_new_tokens`` steps;
this is checked (``usage.completion_tokens`` on the service, the audio columns upstream), and so are the
prompts (the ``input_ids`` and reference codes of the service's prompt and of upstream's
``model.generate`` call); the audio codes are compared and their differences counted (greedy on both
sides, as the service's sampled draws are its own). The service's greedy codes equal upstream's
``model.generate`` (``tests/test_batching.py``), yet on the tiny model most differ from
``HiggsAudioServeEngine``'s (its random logits are nearly flat, so any difference in rounding flips them;
where that engine's rounding differs was not investigated). The tiny audio tokenizer's codebooks are
filled by k-means on its first ``encode`` (the service's warm-up does one), so upstream's tokenizer gets
the service's state first.

The contenders never run at once: requests are sequential, interleaved (service and upstream
alternate, in an order that flips every repeat) at two lengths. Fixed costs (HTTP, prompt building,
upstream's reference encoding) cancel in the slope ``(t_long - t_short) / (n_long - n_short)`` of the
median times, reported as each side's per-step time next to the plain per-request medians. Audio
decoding (the codec) and the service's WAV/base64/JSON encoding grow with the length, so they are part
of the slope; the time in the decoding loop (upstream's ``model.generate``; the service's decoder
``prefill`` and ``launch``, its steps) and inside the codec's ``decode`` is measured on both sides too,
by wrapping those methods, and their slopes are printed as a breakdown.
The process's CPU time (all threads) over each request is recorded as well: on a shared machine it is
less disturbed by other processes' load than the wall clock, so its slope gives a second ratio. Checks of
a response (parsing, decoding its WAV) happen after its timing stops.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import Stopwatch, conditions, serve, service_settings, spread, workspace, write_tiny_models

TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."
GOAL = 1.05


@dataclass
class Side:
    """One contender: how to run a request of ``n`` steps, and its timings by length."""

    name: str
    run: Callable[[int], Callable[[], Any]]
    """Runs a request of ``n`` steps; returns what checks it and gives its audio codes (called untimed)."""
    loop: Stopwatch = field(default_factory=Stopwatch)
    decode: Stopwatch = field(default_factory=Stopwatch)
    total: dict[int, list[float]] = field(default_factory=dict)
    cpu: dict[int, list[float]] = field(default_factory=dict)
    in_loop: dict[int, list[float]] = field(default_factory=dict)
    in_decode: dict[int, list[float]] = field(default_factory=dict)

    def timed(self, n: int) -> Any:
        """Run once, recording the wall time, the process's CPU time and the time in the wrapped methods."""
        self.loop.take()
        self.decode.take()
        cpu_started, started = time.process_time(), time.perf_counter()
        finish = self.run(n)
        self.total.setdefault(n, []).append(time.perf_counter() - started)
        self.cpu.setdefault(n, []).append(time.process_time() - cpu_started)
        self.in_loop.setdefault(n, []).append(self.loop.take()[0])
        self.in_decode.setdefault(n, []).append(self.decode.take()[0])
        return finish()


def median(values: list[float]) -> float:
    return statistics.median(values)


def slope(times: dict[int, list[float]], short: int, long: int) -> float:
    """Seconds per step between the two lengths, from the median times."""
    return (median(times[long]) - median(times[short])) / (long - short)


class EncodeMemo:
    """Memoises an audio tokenizer's ``encode`` by input, as the service's codes cache does.

    Bare upstream encodes a reference clip again on every call; that fixed cost (seconds on the CPU, and
    noisy) would drown the per-step slope, so upstream is given this cache when the voice has a reference.
    With ``codes``, the cached result is those codes instead of the encoder's (same shape): the service
    encoded the voice's clip before storing it as 16-bit WAV, and re-encoding the stored file changes a
    few codes, which would make the two sides' audio differ.
    """

    def __init__(self, codec: Any, codes: Any = None):
        self.inner = codec.encode
        self.codes = codes
        self.cache: dict[tuple[str, Any], Any] = {}
        self.miss_seconds: list[float] = []
        self.replaced = 0
        codec.encode = self

    def __call__(self, audio: Any, *args: Any, **kwargs: Any) -> Any:
        digest = hashlib.sha256(np.ascontiguousarray(audio).tobytes()).hexdigest()
        key = (digest, repr((args, sorted(kwargs.items()))))
        if key not in self.cache:
            started = time.perf_counter()
            result = self.inner(audio, *args, **kwargs)
            self.miss_seconds.append(time.perf_counter() - started)
            if self.codes is not None:
                codes = self.codes.to(result.device, result.dtype).reshape(result.shape)
                self.replaced = int((codes != result).sum())
                result = codes
            self.cache[key] = result
        return self.cache[key]


def same_prompt(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Compare two prompts' model inputs: text ids, and reference codes if any."""
    import torch

    if not torch.equal(a["input_ids"].cpu(), b["input_ids"].cpu()):
        return f"NO (input ids differ: {tuple(a['input_ids'].shape)} vs {tuple(b['input_ids'].shape)})"
    found = []
    for key in ("audio_in_ids", "audio_out_ids"):
        codes_a, codes_b = (None if c is None or c.numel() == 0 else c for c in (a.get(key), b.get(key)))
        if codes_a is None and codes_b is None:
            continue
        if codes_a is None or codes_b is None or codes_a.shape != codes_b.shape:
            return f"NO ({key} differ in shape)"
        differ = int((codes_a.cpu() != codes_b.cpu()).sum())
        verdict = "equal" if differ == 0 else f"differ in {differ} codes"
        found.append(f"{key} {tuple(codes_a.shape)} {verdict}")
    return "input ids equal, " + (", ".join(found) if found else "no reference audio")


def main() -> None:
    """Run the benchmark and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per side and length (median)")
    parser.add_argument(
        "--lengths",
        type=int,
        nargs=2,
        default=[64, 256],
        metavar=("SHORT", "LONG"),
        help="the two max_tokens values (decoding steps) the slope is taken between",
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    parser.add_argument("--voice", default="alloy", help="audio.voice of the service's requests")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--slots", type=int, default=1, help="the service's rows (HIGGS_MAX_BATCH_SIZE)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    short, long = sorted(args.lengths)
    if short == long or short < 1:
        parser.error("--lengths needs two different positive lengths")

    with workspace() as tmp:
        run(args, short, long, write_tiny_models(tmp), tmp / "voices")


def run(args: argparse.Namespace, short: int, long: int, tiny: dict[str, str], voices_dir: Path) -> None:
    import httpx
    import soundfile as sf
    import torch
    from boson_multimodal.data_types import AudioContent, ChatMLSample, Message
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

    from app import create_app

    torch.set_num_threads(args.threads)
    settings = service_settings(
        tiny["HIGGS_MODEL"],
        tiny["HIGGS_AUDIO_TOKENIZER"],
        voices_dir,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.slots,
        ras_window=0,  # RAS redraws are random draws, each side's own: greedy answers then differ
    )
    upstream = HiggsAudioServeEngine(
        settings.model,
        settings.audio_tokenizer,
        device=args.device,
        torch_dtype=getattr(torch, args.dtype),
        kv_cache_lengths=settings.kv_cache_lengths,
    )

    app = create_app(settings)
    with serve(app) as url, httpx.Client(base_url=url, timeout=600) as client:
        engine = app.state.engine  # the app's own engine, loaded and warmed up by its lifespan
        # Its warm-up's encode k-means-initialised the tiny codec's codebooks: give upstream the same ones
        # (the names both hold: the service's weight norm is folded into plain weights of the same values).
        theirs = upstream.audio_tokenizer.state_dict()
        ours = {k: v for k, v in engine.higgs.codec.state_dict().items() if k in theirs}
        upstream.audio_tokenizer.load_state_dict(ours, strict=False)
        worker_threads = torch.get_num_threads()  # intra-op threads are per process
        if worker_threads != torch.get_num_threads():
            raise RuntimeError(
                f"torch threads differ: service worker {worker_threads}, upstream {torch.get_num_threads()}"
            )

        requests: list[Any] = []  # the GenerationRequests the service's engine receives
        real_generate = engine.generate

        async def spy(request: Any) -> Any:
            requests.append(request)
            return await real_generate(request)

        engine.generate = spy
        service_usage: dict[str, int] = {}
        results: list[Any] = []  # the engine's finished generations (their audio codes)
        engine.observers.append(results.append)

        def run_service(n: int) -> Callable[[], Any]:
            response = client.post(
                "/v1/chat/completions",
                json={
                    "model": settings.served_model_name,
                    "modalities": ["text", "audio"],
                    "audio": {"voice": args.voice, "format": "wav"},
                    "messages": [{"role": "user", "content": TEXT}],
                    "max_tokens": n,
                    "seed": args.seed,
                    "temperature": 0,
                },
            )

            def finish() -> Any:
                response.raise_for_status()
                body = response.json()
                assert body["usage"]["completion_tokens"] == n, body["usage"]
                service_usage.update(body["usage"], voice=response.headers.get("x-voice"))
                wav = base64.b64decode(body["choices"][0]["message"]["audio"]["data"])
                samples = sf.read(io.BytesIO(wav), dtype="int16")[0]
                assert len(samples) == results[-1].codes.frames * engine.sample_rate // engine.frame_rate
                return results[-1].codes.codes

            return finish

        # The first request makes a built-in voice if the name is one; its prompt is mirrored upstream.
        run_service(short)()
        engine.generate = real_generate
        messages = []
        for turn in requests[-1].turns:
            if turn.audio is None:
                messages.append(Message(role=turn.role, content=turn.text))
            else:
                clip = voices_dir / f"{service_usage['voice']}.wav"
                messages.append(Message(role=turn.role, content=AudioContent(audio_url=str(clip))))
        sample = ChatMLSample(messages=messages)
        codes = [turn.audio.codes for turn in requests[-1].turns if turn.audio is not None]
        memo = EncodeMemo(upstream.audio_tokenizer, codes[0] if len(codes) == 1 else None) if codes else None

        def run_upstream(n: int) -> Callable[[], Any]:
            response = upstream.generate(
                sample,
                max_new_tokens=n,
                temperature=0.0,
                top_k=settings.top_k,
                top_p=settings.top_p,
                force_audio_gen=True,
                ras_win_len=settings.ras_window,
                seed=args.seed,
            )

            def finish() -> Any:
                columns = torch.from_numpy(response.generated_audio_tokens)
                assert columns.shape[1] == n, columns.shape
                return revert_delay_pattern(columns).clip(0, upstream.audio_codebook_size - 1)[:, 1:-1]

            return finish

        sides = [Side("service (HTTP)", run_service), Side("upstream engine", run_upstream)]
        for method in ("fill", "occupy", "launch"):  # the service's loop: prefills and steps
            sides[0].loop.wrap(engine._decoder, method)
        sides[1].loop.wrap(upstream.model, "generate")
        sides[0].decode.wrap(engine.higgs.codec, "decode")
        sides[1].decode.wrap(upstream.audio_tokenizer, "decode")

        # One untimed run per side and length: warms both up and checks that they do the same work.
        codes_differ = codes_total = 0
        for n in (short, long):
            service_codes, upstream_codes = run_service(n)(), run_upstream(n)()
            assert service_codes.shape == upstream_codes.shape, (service_codes.shape, upstream_codes.shape)
            codes_differ += int((service_codes.cpu() != upstream_codes.cpu()).sum())
            codes_total += service_codes.numel()
        prompt_check = same_prompt(engine._prepare(requests[-1]).inputs, sides[1].loop.last_kwargs)

        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        for rep in range(args.repeats):
            for n in (short, long):
                for side in sides if rep % 2 == 0 else sides[::-1]:
                    side.timed(n)
        elapsed = time.perf_counter() - started

    service, bare = sides
    print(
        f"tiny Higgs models (random weights), {args.device} {args.dtype}; torch threads: service worker "
        f"{worker_threads}, upstream {torch.get_num_threads()}"
    )
    print(
        f"voice {args.voice!r} (served as {service_usage['voice']!r}, "
        f"{'with a reference clip' if memo else 'no reference clip'}); text {len(TEXT)} characters; "
        f"service prompt tokens {service_usage['prompt_tokens']}; seed {args.seed}; "
        f"service slots {engine.slots}"
    )
    print(f"same prompt on both sides: {prompt_check}")
    if memo is not None:
        print(
            f"upstream re-encodes the reference clip on every call ({memo.miss_seconds[0]:.2f} s here); "
            "memoised for the timings, like the service's cache"
        )
        if memo.codes is not None:
            print(
                f"  upstream's encoding of the stored 16-bit clip differed from the service's codes in "
                f"{memo.replaced} codes; upstream was given the service's codes"
            )
    print(
        f"decoding steps: exactly {short} and {long} on both sides; audio codes that differ "
        f"between the sides: {codes_differ} of {codes_total}"
    )
    print(f"{args.repeats} interleaved repeats per side and length ({conditions(elapsed, load_before)})")
    print("medians (min-max)")
    print()
    width = 36
    print(f"{'per request':<{width}} {'max_tokens=' + str(short):>26} {'max_tokens=' + str(long):>26}")
    parts = (
        ("", "total"),
        ("  process CPU time", "cpu"),
        ("  in the decoding loop", "in_loop"),
        ("  in codec decode", "in_decode"),
    )
    for label, attr in parts:
        for side in sides:
            times = getattr(side, attr)
            print(f"{(side.name + label):<{width}} {spread(times[short]):>26} {spread(times[long]):>26}")
    print()

    def row(label: str, s: float, u: float) -> None:
        ratio = f"   ratio {s / u:5.3f}x" if u > 0 and s > 0 else ""
        print(f"  {label:<{width - 2}} service {s * 1e3:7.3f} ms   upstream {u * 1e3:7.3f} ms{ratio}")

    print(f"per step, slope {short} -> {long} steps of the medians:")
    per_step = {
        attr: [slope(getattr(side, attr), short, long) for side in sides]
        for attr in ("total", "cpu", "in_loop", "in_decode")
    }
    row("whole request (wall clock)", *per_step["total"])
    row("  in the decoding loop", *per_step["in_loop"])
    row("  in codec decode", *per_step["in_decode"])
    others = [per_step["total"][i] - per_step["in_loop"][i] - per_step["in_decode"][i] for i in (0, 1)]
    row("  everything else", *others)
    row("whole request, process CPU time", *per_step["cpu"])
    print()
    for n in (short, long):
        print(
            f"ratio service/upstream per request at {n} steps: "
            f"{median(service.total[n]) / median(bare.total[n]):5.3f}x"
        )
    print(
        "ratio service/upstream per step in process CPU time (all threads; less sensitive to other "
        f"processes' load): {per_step['cpu'][0] / per_step['cpu'][1]:5.3f}x"
    )
    ratio = per_step["total"][0] / per_step["total"][1]
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(f"ratio service/upstream per step: {ratio:5.3f}x (goal <= {GOAL:.2f}x: {verdict})")


if __name__ == "__main__":
    main()
