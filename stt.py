"""Speech to text: a small ``Transcriber`` interface, a faster-whisper implementation, and the
formatters (SRT, WebVTT, OpenAI ``verbose_json``) the HTTP layer needs.

Knows nothing about HTTP and keeps no global state (but for CUDA 12's cuBLAS, which
``preload_cuda12_libraries`` loads into the process once, for CTranslate2).  Every problem the caller
caused (unknown language, translation asked of a model that cannot translate, bad temperature or task)
is a ``ValueError`` whose message can be shown to the user as is.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import functools
import logging
import math
import sys
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from faster_whisper import WhisperModel
from faster_whisper.vad import VadOptions, get_speech_timestamps
from transformers.models.whisper.tokenization_whisper import LANGUAGES as WHISPER_LANGUAGES
from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE as WHISPER_LANGUAGE_CODES

from audio import Audio, resample
from settings import Settings
from shutdown import SHUTTING_DOWN

log = logging.getLogger(__name__)

#: Sample rate every Whisper model expects.
WHISPER_SAMPLE_RATE = 16_000

#: CUDA 12 libraries that CTranslate2's PyPI wheels open by name (dlopen) on their first CUDA matrix
#: product, in load order (cuBLAS needs cuBLASLt), and where NVIDIA's ``nvidia-cublas-cu12`` wheel puts
#: them under site-packages.  CTranslate2 4.6 and later need no cuDNN.
CUDA12_LIBRARIES = ("libcublasLt.so.12", "libcublas.so.12")
CUDA12_LIBRARY_DIR = Path("nvidia", "cublas", "lib")

#: Recognitions running or waiting at most, unless ``HIGGS_MAX_QUEUE`` is set (more are refused at once).
MAX_PENDING = 16

#: Tasks Whisper knows.
TASKS = ("transcribe", "translate")

#: ISO-639-1 (and a few ISO-639-3) codes Whisper knows -> the English name OpenAI reports in
#: ``verbose_json``; and English names (with their common variants) -> codes. Whisper's own tables.
LANGUAGE_NAMES: dict[str, str] = WHISPER_LANGUAGES
_NAME_TO_CODE: dict[str, str] = WHISPER_LANGUAGE_CODES

#: Silence the voice-activity filter keeps on each side of a stretch of speech (faster-whisper's default,
#: seconds); stretches are cut only at pauses of 2 s or more, so every stretch has this much on each side.
SPEECH_PAD = VadOptions().speech_pad_ms / 1000

#: How far into a stretch of speech a segment must reach to hold any of its words: past the stretch's
#: padding of silence, and by 0.2 s, about the shortest spoken word, more.
WORDS_IN_REACH = SPEECH_PAD + 0.2

#: Whisper's time frames per second: a segment's ``seek`` counts these (10 ms each), as OpenAI's does.
FRAMES_PER_SECOND = 100

#: Temperatures tried in turn when the caller asks for temperature 0: like OpenAI's API, 0 means
#: "start greedy and raise the temperature while the decode looks like a failure".
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class Word:
    """One word with its time span (seconds from the start of the audio)."""

    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Segment:
    """One decoded segment, with the fields OpenAI's ``verbose_json`` reports."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] | None = None


@dataclass(frozen=True)
class Transcript:
    """The whole result: stripped text, ISO language code, input duration in seconds, segments."""

    text: str
    language: str
    duration: float
    segments: list[Segment]


@dataclass(frozen=True)
class SpeechTimeline:
    """The stretches of speech Whisper decoded, joined, and where each lies in the original audio.

    With the voice-activity filter Whisper hears only the speech, the pauses between stretches cut out, and
    gives times on that shorter timeline; these map them back. Stretch ``i`` spans ``starts[i]`` to
    ``ends[i]`` (seconds) of what was decoded and was found ``offsets[i]`` seconds later in the original.
    Without the filter there is one stretch, the whole audio, found where it was decoded.
    """

    starts: tuple[float, ...]
    ends: tuple[float, ...]
    offsets: tuple[float, ...]

    @classmethod
    def of(cls, chunks: list[dict], sample_rate: int) -> SpeechTimeline:
        """From the voice-activity filter's stretches (``{"start", "end"}`` in samples, in order)."""
        starts, ends, offsets, decoded = [], [], [], 0
        for chunk in chunks:
            starts.append(decoded / sample_rate)
            offsets.append((chunk["start"] - decoded) / sample_rate)
            decoded += chunk["end"] - chunk["start"]
            ends.append(decoded / sample_rate)
        return cls(tuple(starts), tuple(ends), tuple(offsets))

    @classmethod
    def whole(cls, seconds: float) -> SpeechTimeline:
        """Nothing cut out: decoded times are the original times."""
        return cls((0.0,), (seconds,), (0.0,))

    def stretch(self, time: float, *, end: bool = False) -> int:
        """The stretch that holds ``time``: where one stretch ends and the next begins, a start belongs to
        the later one and an ``end`` to the earlier one."""
        index = bisect_left(self.ends, time) if end else bisect_right(self.ends, time)
        return min(index, len(self.ends) - 1)

    def span(self, start: float, end: float) -> tuple[float, float, int]:
        """A segment's ``start`` and ``end`` in the original audio, and the stretch its start lies in.

        Whisper puts the boundary between two sentences anywhere in the pause it heard between them, so
        a segment can begin in the last moments of one stretch or end in the first of the next, and mapped
        as it stands it would cover the whole pause that was cut out (a subtitle shown for the 40 s of
        silence before the next words). Every stretch begins and ends with ``SPEECH_PAD`` of silence, so a
        segment that reaches less than ``WORDS_IN_REACH`` into a stretch holds none of its words: it starts,
        or ends, in the stretch beside it instead.
        """
        first, last = self.stretch(start), max(self.stretch(start), self.stretch(end, end=True))
        while first < last and self.ends[first] - start < WORDS_IN_REACH:
            first += 1
            start = self.starts[first]
        while last > first and end - self.starts[last] < WORDS_IN_REACH:
            last -= 1
            end = self.ends[last]
        return start + self.offsets[first], max(start, end) + self.offsets[last], first

    def word(self, start: float, end: float) -> tuple[float, float]:
        """A word's ``start`` and ``end`` in the original audio (both in the stretch of its middle)."""
        offset = self.offsets[self.stretch((start + end) / 2)]
        return start + offset, end + offset

    def window(self, seek: float, stretch: int) -> float:
        """Where the window Whisper decoded from ``seek`` (seconds) began in the original audio, as seen by
        a segment starting in ``stretch``: a window can hold several stretches, and the part of it that
        came before this stretch was elsewhere in the original."""
        return max(seek, self.starts[stretch]) + self.offsets[stretch]


@runtime_checkable
class Transcriber(Protocol):
    """Anything that turns ``Audio`` into a ``Transcript``."""

    @property
    def languages(self) -> frozenset[str]:
        """ISO language codes the loaded model knows (an English-only model knows only ``"en"``)."""
        ...

    @property
    def supports_translation(self) -> bool:
        """Whether ``task="translate"`` (speech in any language -> English text) is available."""
        ...

    def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        task: str = "transcribe",
        word_timestamps: bool = False,
        stop: threading.Event | None = None,
        on_segment: Callable[[Segment], None] | None = None,
    ) -> Transcript:
        """Transcribe (or translate into English) ``audio``; ``ValueError`` for bad arguments. When ``stop``
        is set (the caller left), ``TranscriptionStopped`` as soon as the work can stop. ``on_segment`` is
        called with each segment as soon as it is decoded."""
        ...


# ISO-639-1 codes Whisper spells otherwise (Javanese's "jw"), or not at all (Norwegian Bokmål is its
# Norwegian), and the codes the standard withdrew that systems still send (Java's locales: "iw", "in", "ji").
_ISO_TO_WHISPER = {"jv": "jw", "nb": "no", "iw": "he", "in": "id", "ji": "yi", "fil": "tl"}


def _code(key: str) -> str | None:
    """Whisper's code for a lowercase code or English name, else None."""
    key = _ISO_TO_WHISPER.get(key, key)
    return key if key in LANGUAGE_NAMES else _NAME_TO_CODE.get(key)


def normalize_language(language: str | None, known: Iterable[str] = LANGUAGE_NAMES) -> str | None:
    """Map a user-given language (``"en"``, ``"EN"``, ``"english"``, a locale such as ``"en-US"``; an
    ISO-639-1 code Whisper spells otherwise, such as ``"jv"`` for its ``"jw"``) to Whisper's code.

    ``None`` or an empty string means "detect it".  Raises ``ValueError`` when the language is
    not one Whisper knows, or not one in ``known`` (the languages of the loaded model).
    """
    if language is None or not language.strip():
        return None
    key = language.strip().lower().replace("_", "-")
    code = _code(key) or _code(key.split("-")[0])  # a locale ("zh-CN", "en_US"): its language
    if code is None:
        raise ValueError(f"Unknown language {language!r}: use an ISO-639-1 code such as 'en', 'fr' or 'de'.")
    known = frozenset(known)
    if code not in known:
        supported = ", ".join(sorted(known))
        raise ValueError(
            f"Language {language!r} is not supported by the loaded speech-to-text model "
            f"(it supports: {supported})."
        )
    return code


def _whisper_samples(audio: Audio) -> np.ndarray:
    """``audio``'s samples as contiguous mono float32 at Whisper's rate."""
    samples = np.asarray(audio.samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"Expected mono audio (1-D samples), got shape {samples.shape}.")
    if audio.sample_rate <= 0:
        raise ValueError(f"Invalid sample rate {audio.sample_rate}.")
    return resample(samples, audio.sample_rate, WHISPER_SAMPLE_RATE)


def find_cuda12_libraries(search_path: Iterable[str] | None = None) -> list[Path]:
    """The files of ``CUDA12_LIBRARIES`` in the first folder of ``search_path`` (default ``sys.path``, which
    holds site-packages) that has all of them under ``CUDA12_LIBRARY_DIR``; empty when none has."""
    for entry in sys.path if search_path is None else search_path:
        folder = Path(entry or ".") / CUDA12_LIBRARY_DIR
        paths = [folder / name for name in CUDA12_LIBRARIES]
        if all(path.is_file() for path in paths):
            return paths
    return []


def preload_cuda12_libraries(search_path: Iterable[str] | None = None) -> list[Path]:
    """Load CUDA 12's cuBLAS from the ``nvidia-cublas-cu12`` wheel so that CTranslate2 finds it on a GPU.

    CTranslate2 asks the dynamic loader for ``libcublas.so.12`` by name; the loader answers such a request
    with an already loaded library of that soname before searching any folder.  Loading the wheel's files
    by path first therefore works without ``LD_LIBRARY_PATH`` (which a running process cannot change for
    itself).  They are loaded ``RTLD_LOCAL`` so that their symbols never stand in for the CUDA 13 cuBLAS
    that PyTorch uses.  Returns the files loaded: none off Linux, when the wheel is not installed, or when
    loading fails (logged; CTranslate2 then reports the missing library itself).  Loading twice is harmless.
    """
    if not sys.platform.startswith("linux"):
        return []
    paths = find_cuda12_libraries(search_path)
    try:
        for path in paths:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    except OSError as exc:
        log.warning("could not load CUDA 12's cuBLAS from %s: %s", paths[0].parent, exc)
        return []
    return paths


class WhisperTranscriber:
    """``Transcriber`` backed by faster-whisper (CTranslate2).

    ``model`` is a faster-whisper model name (``"large-v3-turbo"``, ``"tiny.en"``: downloaded by
    faster-whisper unless cached) or the path of a local CTranslate2 Whisper model folder.
    ``device="auto"`` picks CUDA when torch sees a GPU, else CPU; ``compute_type="auto"`` picks
    ``float16`` on CUDA and ``int8`` on CPU.  ``cpu_threads=0`` lets CTranslate2 choose.
    ``num_workers`` > 1 lets that many ``transcribe`` calls from different threads run at once.
    On CUDA, CUDA 12's cuBLAS is preloaded first (``preload_cuda12_libraries``).

    ``vad_filter`` (on by default) runs Silero voice-activity detection first and decodes only the
    speech it finds, dropping stretches of speech shorter than ``min_speech_ms``: on silence, noise or a
    fragment of a syllable Whisper otherwise invents words ("You", "Thank you.").
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        compute_type: str = "auto",
        cpu_threads: int = 0,
        *,
        beam_size: int = 5,
        vad_filter: bool = True,
        min_speech_ms: int = 250,
        num_workers: int = 1,
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if compute_type == "auto":
            compute_type = "float16" if device.startswith("cuda") else "int8"
        if device.startswith("cuda"):
            loaded = preload_cuda12_libraries()
            log.info("CUDA 12 cuBLAS for speech recognition: %s", loaded[-1] if loaded else "not preloaded")
        self.model_name = str(model)
        self.device = device
        self.compute_type = compute_type
        self.beam_size = beam_size
        self.vad_filter = vad_filter
        self.min_speech_ms = min_speech_ms
        self._model = WhisperModel(
            self.model_name,
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=num_workers,
        )
        self._multilingual = bool(self._model.model.is_multilingual)
        self._languages = frozenset(self._model.supported_languages)

    @property
    def languages(self) -> frozenset[str]:
        """ISO codes the loaded model knows; ``{"en"}`` for English-only (``.en``) models."""
        return self._languages

    @property
    def supports_translation(self) -> bool:
        """False for English-only models and for ``turbo`` models (not trained to translate)."""
        return self._multilingual and "turbo" not in self.model_name.lower()

    def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        task: str = "transcribe",
        word_timestamps: bool = False,
        stop: threading.Event | None = None,
        on_segment: Callable[[Segment], None] | None = None,
    ) -> Transcript:
        """Transcribe ``audio`` (any sample rate; resampled to 16 kHz).

        ``language=None`` detects the language (always ``"en"`` on English-only models);
        ``prompt`` conditions the first window (spelling, style); ``temperature=0`` decodes
        greedily/beam and falls back to higher temperatures on failure, as OpenAI's API does,
        any other value in (0, 1] samples at that temperature only.  ``task="translate"``
        produces English text.  Raises ``ValueError`` for an argument the model can't honour, and
        ``TranscriptionStopped`` after the segment being decoded when ``stop`` is set.  ``on_segment`` (if
        given) is called on this thread with each segment as soon as it is decoded.

        Times count from the start of ``audio`` whether or not the voice-activity filter cut pauses out
        (``SpeechTimeline``), and lie within it: a segment or word Whisper placed past the end (it does on
        clips shorter than a second) ends with the audio.
        """
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}: expected 'transcribe' or 'translate'.")
        if task == "translate" and not self.supports_translation:
            why = (
                "it is English-only"
                if not self._multilingual
                else "turbo models were not trained to translate"
            )
            raise ValueError(
                f"Translation is not available with the loaded speech-to-text model ({why}); "
                "use transcription instead."
            )
        code = normalize_language(language, self._languages)
        if not isinstance(temperature, int | float) or math.isnan(temperature) or not 0 <= temperature <= 1:
            raise ValueError(f"temperature must be between 0 and 1, got {temperature!r}.")
        samples = _whisper_samples(audio)
        duration = float(audio.duration)
        timeline = SpeechTimeline.whole(samples.size / WHISPER_SAMPLE_RATE)
        if self.vad_filter and samples.size:
            # The filter runs here rather than in faster-whisper, whose mapping back to the original times
            # stretches segments over the pauses it cut out (see ``SpeechTimeline.span``).
            chunks = get_speech_timestamps(samples, VadOptions(min_speech_duration_ms=self.min_speech_ms))
            kept = sum(c["end"] - c["start"] for c in chunks)
            log.debug("voice-activity filter kept %.1f s of %.1f s", kept / WHISPER_SAMPLE_RATE, duration)
            timeline = SpeechTimeline.of(chunks, WHISPER_SAMPLE_RATE)
            samples = np.concatenate([samples[c["start"] : c["end"]] for c in chunks] or [samples[:0]])
        if samples.size == 0:
            return Transcript(text="", language=code or "en", duration=duration, segments=[])

        temperatures = FALLBACK_TEMPERATURES if temperature == 0 else (float(temperature),)
        raw_segments, info = self._model.transcribe(
            samples,
            language=code,
            task=task,
            beam_size=self.beam_size,
            temperature=list(temperatures),
            initial_prompt=prompt.strip() if prompt and prompt.strip() else None,
            word_timestamps=word_timestamps,
            vad_filter=False,
        )
        # faster-whisper decodes lazily: all the work happens while this generator is consumed, a window of
        # up to 30 s at a time, so a caller that left stops it before the next window.
        segments = []
        for i, raw in enumerate(raw_segments):
            segment = _convert_segment(i, raw, word_timestamps, timeline, duration)
            segments.append(segment)
            if on_segment is not None:
                on_segment(segment)
            if stop is not None and stop.is_set():
                raise TranscriptionStopped(
                    f"stopped after {segment.end:.1f} s of {duration:.1f} s: the caller left"
                )
        text = "".join(s.text for s in segments).strip()
        return Transcript(text=text, language=info.language, duration=duration, segments=segments)

    def warm_up(self) -> None:
        """Transcribe 1 s of silence so that the first real request does not pay for lazy init.

        The silence is at 24 kHz so that the resampling path is exercised too.  The model is then run on it
        once more without the voice-activity filter, which finds no speech in silence and skips the model.
        """
        silence = Audio(np.zeros(24_000, dtype=np.float32), 24_000)
        self.transcribe(silence)
        if self.vad_filter:
            segments, _ = self._model.transcribe(
                _whisper_samples(silence), beam_size=self.beam_size, temperature=0.0, vad_filter=False
            )
            list(segments)  # decoding happens as the generator is consumed


class TranscriptionStopped(Exception):
    """The caller left, and the transcription stopped between two segments."""


class TranscriberClosed(Exception):
    """The server is shutting down: a recognition running or waiting was ended (``end_running``)."""


class TranscriberBusy(Exception):
    """Too many transcriptions are running or waiting; the request was not queued."""


class TranslatorUnavailable(Exception):
    """The translation model, loaded on first use, could not be loaded or cannot translate."""


class AsyncTranscriber:
    """Async face of a ``Transcriber`` for the HTTP layer.

    ``await transcribe(...)`` runs the blocking ``Transcriber.transcribe`` on this object's own
    worker thread(s) (``max_workers``, 1 by default, so requests queue instead of competing for
    the model and the event loop and the default executor stay free).  ``ValueError`` from the
    wrapped transcriber propagates unchanged.  Call ``close()`` at shutdown.

    ``translator``, when given, makes the ``Transcriber`` used for ``task="translate"`` if the wrapped
    one cannot translate (English-only and turbo models): it is called once, on the worker thread, at the
    first translation, so that a second model costs memory only once someone translates.  A failure to
    make it is ``TranslatorUnavailable`` (and is retried on the next translation).
    """

    def __init__(
        self,
        transcriber: Transcriber,
        max_workers: int = 1,
        max_pending: int = MAX_PENDING,
        translator: Callable[[], Transcriber] | None = None,
    ) -> None:
        self.transcriber = transcriber
        self.max_pending = max_pending
        self.observers: list[Callable[[str, float, float], None]] = []
        """Called on the worker thread with each recognition that ended with a result: its task, its audio's
        seconds and its seconds from queueing to result (metrics)."""
        self._pending = 0
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="stt")
        self._stops: set[threading.Event] = set()  # of the recognitions running or waiting
        self._stops_lock = threading.Lock()
        self._closing = False
        self._make_translator = translator
        self._translator: Transcriber | None = None
        self._translator_lock = threading.Lock()

    @property
    def languages(self) -> frozenset[str]:
        """The wrapped transcriber's languages."""
        return self.transcriber.languages

    @property
    def supports_translation(self) -> bool:
        """Whether the wrapped transcriber can translate or a translation model is set up."""
        return self.transcriber.supports_translation or self._make_translator is not None

    @property
    def translator(self) -> Transcriber | None:
        """The translation model once it has been loaded (``None`` before the first translation)."""
        return self._translator

    def _for_task(self, task: str) -> Transcriber:
        """The transcriber for ``task``, making the translation model on first use (worker thread)."""
        if task != "translate" or self.transcriber.supports_translation or self._make_translator is None:
            return self.transcriber
        with self._translator_lock:
            if self._translator is None:
                try:
                    translator = self._make_translator()
                except Exception as exc:  # a download, a folder or CUDA: the server's set-up, not the request
                    log.exception("the translation model could not be loaded")
                    raise TranslatorUnavailable(
                        "the translation model could not be loaded; see the server log"
                    ) from exc
                if not translator.supports_translation:
                    raise TranslatorUnavailable(
                        "the configured translation model cannot translate (English-only and turbo "
                        "models cannot); configure a multilingual Whisper model such as large-v3"
                    )
                self._translator = translator
            return self._translator

    def _run(self, audio: Audio, task: str, stop: threading.Event, **options: object) -> Transcript:
        if stop.is_set():  # (its caller left, or the server is shutting down, while it waited)
            raise TranscriptionStopped("stopped before it began")
        return self._for_task(task).transcribe(audio, task=task, stop=stop, **options)

    def end_running(self) -> None:
        """At shutdown: every recognition running stops after the segment it is decoding, every one waiting
        stops before it begins, each with ``TranscriberClosed`` for its caller (a transcription running at
        SIGTERM was cut off with no answer, and kept the process up for its whole file: 50 s for 3 min of
        speech on a CPU, past the shutdown timeout); and new ones are refused the same way."""
        self._closing = True
        with self._stops_lock:
            for stop in self._stops:
                stop.set()

    def _ended(self, exc: TranscriptionStopped) -> BaseException:
        """What a caller still waiting hears of its stopped recognition: ``TranscriberClosed`` at shutdown."""
        return TranscriberClosed(SHUTTING_DOWN) if self._closing else exc

    async def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        task: str = "transcribe",
        word_timestamps: bool = False,
    ) -> Transcript:
        """``Transcriber.transcribe`` on the worker thread; same arguments, result and errors (and
        ``TranslatorUnavailable`` when the translation model cannot be had). A caller that stops waiting
        (cancelled: its client hung up) drops a job still queued and stops a running one after the
        segment it is decoding."""
        stop = threading.Event()
        job = self._submit(audio, task, stop, language=language, prompt=prompt, temperature=temperature,
                           word_timestamps=word_timestamps)  # fmt: skip
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            stop.set()
            raise
        except TranscriptionStopped as exc:
            raise self._ended(exc) from None

    async def stream(
        self,
        audio: Audio,
        *,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        task: str = "transcribe",
    ) -> AsyncIterator[Segment | Transcript]:
        """Each segment as soon as the worker has decoded it, then the whole ``Transcript``; the arguments
        and errors of ``transcribe`` (an error about the arguments comes before any segment). Closing the
        iterator early (its client hung up) drops a job still queued and stops a running one after the
        segment it is decoding, as cancelling ``transcribe`` does."""
        loop = asyncio.get_running_loop()
        decoded: asyncio.Queue[Segment | Future] = asyncio.Queue()

        def put(item: Segment | Future) -> None:
            try:
                loop.call_soon_threadsafe(decoded.put_nowait, item)
            except RuntimeError:  # the event loop is closed (shut down): nobody reads it
                pass

        stop = threading.Event()
        job = self._submit(audio, task, stop, language=language, prompt=prompt, temperature=temperature,
                           on_segment=put)  # fmt: skip
        job.add_done_callback(put)  # after every segment: they were put from the worker before it was done
        try:
            while not isinstance(item := await decoded.get(), Future):
                yield item
            try:
                result = item.result()
            except TranscriptionStopped as exc:
                raise self._ended(exc) from None
            yield result
        finally:
            stop.set()
            job.cancel()  # drops it if it still waits for the worker

    def _submit(self, audio: Audio, task: str, stop: threading.Event, **options: object) -> Future:
        """Queue ``transcribe`` for the worker, counted as pending until it is over (or dropped);
        ``TranscriberBusy`` when too many are."""
        self.check_room()
        call = functools.partial(self._run, audio, task, stop=stop, **options)
        queued = time.monotonic()
        self._pending += 1
        # In the caller's context, so that log lines from the worker carry the request's id.
        with self._stops_lock:
            self._stops.add(stop)
        job = self._executor.submit(contextvars.copy_context().run, call)
        loop = asyncio.get_running_loop()

        # Counted until the job is over (or dropped), not until the caller stops waiting: a caller that
        # leaves (its client hung up) cancels the job, which drops it while it waits for the worker; one
        # already running stops after its current segment and counts until then.
        def done(future: Future) -> None:
            with self._stops_lock:
                self._stops.discard(stop)
            try:
                loop.call_soon_threadsafe(self._release)
            except RuntimeError:  # the event loop is closed (shut down): nothing counts any more
                pass
            if not future.cancelled() and future.exception() is None and not stop.is_set():  # (whole)
                for observe in self.observers:
                    observe(task, audio.duration, time.monotonic() - queued)

        job.add_done_callback(done)
        return job

    def _release(self) -> None:
        self._pending -= 1

    def check_room(self) -> None:
        """``TranscriberClosed`` once closing, ``TranscriberBusy`` while ``max_pending`` recognitions run or
        wait; a caller asks before it decodes a clip (a security review: a full queue still cost each
        request its upload's decode)."""
        if self._closing:
            raise TranscriberClosed(SHUTTING_DOWN)
        if self._pending >= self.max_pending:  # the event loop is the only writer: no lock needed
            raise TranscriberBusy(
                f"speech recognition is busy ({self._pending} requests queued); retry shortly"
            )

    @property
    def pending(self) -> int:
        """Recognitions running or waiting for the worker (``max_pending`` at most)."""
        return self._pending

    def close(self) -> None:
        """Stop the worker thread(s), dropping queued calls; idempotent."""
        self._executor.shutdown(wait=True, cancel_futures=True)


def _convert_segment(
    index: int, s: object, word_timestamps: bool, timeline: SpeechTimeline, duration: float
) -> Segment:
    """faster-whisper ``Segment`` -> our ``Segment``: plain Python numbers, ids from 0 like OpenAI, times in
    the original audio (``timeline``) rounded to 10 ms and within ``[0, duration]``; a segment with words
    spans its words, as faster-whisper's own segments with words do."""

    def within(start: float, end: float) -> tuple[float, float]:
        start = min(max(0.0, round(start, 2)), duration)
        return start, min(max(start, round(end, 2)), duration)

    start, end, stretch = timeline.span(float(s.start), float(s.end))  # type: ignore[attr-defined]
    window = timeline.window(s.seek / FRAMES_PER_SECOND, stretch)  # type: ignore[attr-defined]
    words = None
    if word_timestamps:
        words = []
        for w in s.words or []:  # type: ignore[attr-defined]
            w_start, w_end = within(*timeline.word(float(w.start), float(w.end)))
            words.append(Word(word=w.word, start=w_start, end=w_end, probability=float(w.probability)))
        if words:
            start, end = words[0].start, words[-1].end
    start, end = within(start, end)
    return Segment(
        id=index,
        seek=min(round(window * FRAMES_PER_SECOND), math.floor(start * FRAMES_PER_SECOND)),
        start=start,
        end=end,
        text=str(s.text),  # type: ignore[attr-defined]
        tokens=[int(t) for t in s.tokens],  # type: ignore[attr-defined]
        temperature=float(s.temperature or 0.0),  # type: ignore[attr-defined]
        avg_logprob=float(s.avg_logprob),  # type: ignore[attr-defined]
        compression_ratio=float(s.compression_ratio),  # type: ignore[attr-defined]
        no_speech_prob=float(s.no_speech_prob),  # type: ignore[attr-defined]
        words=words,
    )


# --------------------------------------------------------------------------- formatting


def _timestamp(seconds: float, decimal_marker: str) -> str:
    """``HH:MM:SS<marker>mmm`` (hours keep growing past 99)."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cues(t: Transcript) -> list[tuple[float, float, str]]:
    """Non-empty segments as (start, end, text) with end >= start, clamped to the audio."""
    cues = []
    for s in t.segments:
        text = s.text.strip()
        if not text:
            continue
        start = min(max(0.0, s.start), t.duration) if t.duration > 0 else max(0.0, s.start)
        end = min(max(start, s.end), t.duration) if t.duration > 0 else max(start, s.end)
        cues.append((start, end, text.replace("-->", "->")))
    return cues


def to_srt(t: Transcript) -> str:
    """SubRip subtitles, one cue per segment (``00:00:01,000 --> 00:00:02,500``)."""
    blocks = [
        f"{i}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n{text}\n"
        for i, (start, end, text) in enumerate(_cues(t), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    """WebVTT subtitles: ``WEBVTT`` header, then one cue per segment (``00:00:01.000 --> ...``); ``&`` and
    ``<`` in the text escaped, as WebVTT requires of cue text."""
    blocks = [
        f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n{_vtt_escape(text)}\n"
        for start, end, text in _cues(t)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    """Cue text as WebVTT allows it: ``&`` and ``<`` begin escapes and tags there."""
    return text.replace("&", "&amp;").replace("<", "&lt;")


def usage(t: Transcript) -> dict:
    """OpenAI's ``usage`` of a whisper-1 transcription: the audio's duration, in whole seconds rounded up."""
    return {"type": "duration", "seconds": math.ceil(t.duration)}


def language_name(code: str) -> str:
    """ISO code -> the lower-case English name OpenAI reports (``"en"`` -> ``"english"``)."""
    return LANGUAGE_NAMES.get(code, code)


def to_verbose_json(t: Transcript, task: str, include_words: bool, include_segments: bool) -> dict:
    """OpenAI's ``verbose_json`` body.

    ``{"task", "language" (English name), "duration", "text", "segments"?, "words"?}``; the
    ``segments``/``words`` keys are present only when asked for, as OpenAI does
    (``timestamp_granularities``).  ``include_words`` needs a transcript made with
    ``word_timestamps=True``, else ``ValueError``.  A translation's language is the one it is in,
    ``"english"``, as OpenAI reports it (not the language that was spoken).
    """
    body: dict = {
        "task": task,
        "language": language_name("en" if task == "translate" else t.language),
        "duration": t.duration,
        "text": t.text,
    }
    if include_segments:
        body["segments"] = [
            {
                "id": s.id,
                "seek": s.seek,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": list(s.tokens),
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in t.segments
        ]
    if include_words:
        if any(s.words is None for s in t.segments):
            raise ValueError("Word timestamps were not computed: transcribe with word_timestamps=True.")
        body["words"] = [
            {"word": w.word.strip(), "start": w.start, "end": w.end}
            for s in t.segments
            for w in (s.words or [])
        ]
    return body


def load_recognizer(settings: Settings) -> AsyncTranscriber:
    """Load faster-whisper as the settings say and warm it up (blocking); the translation model, if set,
    is only described here and loaded on the first translation, on the device recognition runs on.

    On CUDA, CUDA 12's cuBLAS is preloaded from the ``nvidia-cublas-cu12`` wheel (see ``stt``). Should
    CTranslate2 still fail there with ``stt_device=auto``, recognition falls back to the CPU with a warning
    instead of failing the start-up.
    """

    def load(model: str, device: str) -> WhisperTranscriber:
        transcriber = WhisperTranscriber(
            model,
            device=device,
            compute_type=settings.stt_compute_type,
            vad_filter=settings.stt_vad_filter,
            min_speech_ms=settings.stt_min_speech_ms,
        )
        transcriber.warm_up()
        return transcriber

    try:
        transcriber = load(settings.stt_model, settings.stt_device)
    except RuntimeError as exc:
        if settings.stt_device != "auto" or not _cuda_available():
            raise
        log.warning(
            "speech recognition could not run on CUDA (%s); running it on the CPU instead. "
            "See the README's 'Speech recognition on a GPU'.",
            exc,
        )
        transcriber = load(settings.stt_model, "cpu")
    translator = None
    if settings.stt_translation_model:

        def translator() -> WhisperTranscriber:
            log.info("loading the translation model %s", settings.stt_translation_model)
            return load(settings.stt_translation_model, transcriber.device)

    return AsyncTranscriber(transcriber, max_pending=settings.max_queue or MAX_PENDING, translator=translator)


def _cuda_available() -> bool:
    return torch.cuda.is_available()
