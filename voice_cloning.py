"""Voice references: validate a clip, cache its audio codes, build the in-context prompt Higgs was trained on.

A reference is a few seconds of someone speaking plus what they said. Higgs Audio clones a voice when the
prompt shows the model "saying" that clip::

    system:    Generate audio following instruction. <scene description>
    user:      <the reference's transcript>
    assistant: <the reference's audio codes>
    user:      <the text to speak>
    assistant: <|audio_out_bos|> ... generated in the same voice

Everything here that can fail on user input runs on the CPU before any GPU work, and fails with
``InvalidAudio``/``InvalidReference`` naming the request field (``param``) to fix. No HTTP knowledge; the
stored voices are ``voices.py``'s.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from audio import (
    Audio,
    AudioError,
    AudioTooLarge,
    AudioTooLong,
    active_speech_seconds,
    decode_audio,
    decode_base64,
    trim_silence,
)
from generation import SYSTEM_TEMPLATE, AudioCodes, Turn
from protocol import InvalidRequest, composed
from text_split import speakable

if TYPE_CHECKING:
    from settings import Settings
    from stt import AsyncTranscriber

log = logging.getLogger(__name__)

V = TypeVar("V")

# The containers and codecs a chat ``input_audio`` part may come in (its ``format`` values accepted).
# Silence kept at each end of a trimmed reference (``audio.trim_silence``'s margin).
TRIM_PAD_SECONDS = 0.1
INPUT_AUDIO_FORMATS = frozenset({"wav", "mp3", "flac", "ogg", "opus", "webm", "m4a", "mp4", "aac"})


class InvalidAudio(ValueError):
    """Audio in a request that cannot be used; ``param`` names the request field at fault, ``code`` says
    why for programs (``file_too_large`` for audio past the upload limit)."""

    def __init__(self, message: str, param: str, code: str = "invalid_audio"):
        super().__init__(message)
        self.param = param
        self.code = code


class InvalidReference(InvalidAudio):
    """A voice reference that cannot be used (not enough speech, an empty transcript, ...)."""


@dataclass(frozen=True)
class ReferenceLimits:
    """Bounds on a voice reference, and the rate (the audio tokenizer's) every clip is decoded at."""

    sample_rate: int
    min_speech_seconds: float = 1.0
    max_seconds: float = 30.0
    max_bytes: int = 25 * 1024 * 1024
    max_transcript_characters: int = 1000

    @property
    def decode_seconds(self) -> float:
        """The longest clip decoded: ``max_seconds`` counts the sound between the silence at a clip's ends
        (trimmed), and a recording may hold as much silence around it."""
        return 2 * self.max_seconds

    def too_long(self, exc: AudioTooLong) -> str:
        """Why a clip past ``decode_seconds`` is refused, stating the limit the settings give (the decoding
        bound, twice as long, read as the limit: "60 s" for a limit of 30)."""
        length = f"{exc.seconds:.1f} s long" if exc.seconds else f"over {self.decode_seconds:g} s long"
        return (
            f"voice reference is {length}; at most {self.max_seconds:g} s of it is taken, the silence at its "
            "ends aside (HIGGS_MAX_REFERENCE_SECONDS): send a shorter clip (5 to 15 s works best)"
        )

    @classmethod
    def from_settings(cls, settings: Settings, sample_rate: int) -> ReferenceLimits:
        """The limits the settings give, at ``sample_rate``."""
        return cls(
            sample_rate=sample_rate,
            min_speech_seconds=settings.min_reference_seconds,
            max_seconds=settings.max_reference_seconds,
            max_bytes=int(settings.max_upload_mb * 1024 * 1024),
            max_transcript_characters=settings.max_transcript_characters,
        )


@dataclass(frozen=True)
class Reference:
    """A validated voice reference: mono audio at the audio tokenizer's rate, and its key for caching."""

    audio: Audio
    key: str
    transcript: str | None = None


def decode_input_audio(
    data: str,
    fmt: str | None,
    param: str,
    *,
    sample_rate: int,
    max_seconds: float,
    max_bytes: int,
    too_long: Callable[[AudioTooLong], str] | None = None,
) -> Audio:
    """Decode a chat ``input_audio`` part (a voice reference or speech to transcribe): the one decoder.

    ``param`` is the part's request path (``messages[0].content[1]``). Refuses, naming the field to fix, an
    unknown format, bad base64, and bytes that are not audio or are longer than ``max_seconds`` (saying
    ``too_long``'s words where given).
    """
    if fmt is not None and fmt.lower() not in INPUT_AUDIO_FORMATS:
        raise InvalidAudio(
            f"unsupported audio format {fmt!r}; use one of: {', '.join(sorted(INPUT_AUDIO_FORMATS))}, or "
            "leave format out: the bytes say what they are (AIFF and CAF clips decode too, with no format)",
            f"{param}.input_audio.format",
        )
    try:
        raw = decode_base64(data, max_bytes=max_bytes)
        return decode_audio(raw, target_rate=sample_rate, max_seconds=max_seconds)
    except AudioError as exc:
        code = "file_too_large" if isinstance(exc, AudioTooLarge) else "invalid_audio"
        message = too_long(exc) if too_long and isinstance(exc, AudioTooLong) else f"input audio: {exc}"
        raise InvalidAudio(message, f"{param}.input_audio.data", code) from None


def load_reference(
    data: str, fmt: str | None, transcript: str | None, limits: ReferenceLimits, param: str
) -> Reference:
    """Decode and check a base64 reference clip; ``param`` is its request path (``messages[0].content[1]``).

    Refuses what ``decode_input_audio`` refuses, then what ``check_reference`` refuses.
    """
    audio = decode_input_audio(
        data, fmt, param, sample_rate=limits.sample_rate, max_seconds=limits.decode_seconds,
        max_bytes=limits.max_bytes, too_long=limits.too_long,
    )  # fmt: skip
    return check_reference(
        audio, transcript, limits, f"{param}.input_audio.data", f"{param}.input_audio.transcript"
    )


def reference_from_bytes(
    raw: bytes, transcript: str | None, limits: ReferenceLimits, param: str, transcript_param: str
) -> Reference:
    """Decode and check an uploaded reference clip's bytes (``check_reference``)."""
    try:
        audio = decode_audio(raw, target_rate=limits.sample_rate, max_seconds=limits.decode_seconds)
    except AudioTooLong as exc:
        raise InvalidReference(limits.too_long(exc), param) from None
    except AudioError as exc:
        raise InvalidReference(f"voice reference: {exc}", param) from None
    return check_reference(audio, transcript, limits, param, transcript_param)


TRANSCRIPT_FIX = "omit it or give the words spoken"
"""What a request whose reference transcript holds no words is told to do (``check_reference``)."""


def transcript_text(transcript: str) -> str:
    """A reference's words as they are stored and prompted: composed (NFC), as the words to speak are
    (``protocol.composed``: an accent is one character with its letter, for the limit and the tokenizer),
    without a byte-order mark (an editor's, or a form's: no word), on one line with single spaces."""
    return " ".join(composed(transcript).replace("\ufeff", " ").split())


def check_reference(
    audio: Audio,
    transcript: str | None,
    limits: ReferenceLimits,
    param: str,
    transcript_param: str,
    transcript_fix: str = TRANSCRIPT_FIX,
) -> Reference:
    """Check a decoded reference clip and trim its leading and trailing silence.

    Refuses a clip with less than ``limits.min_speech_seconds`` of non-silent sound, and a transcript that
    holds no words, saying ``transcript_fix`` (where the transcript is a file, omitting it is no answer).
    """
    speech = active_speech_seconds(audio)
    if speech < limits.min_speech_seconds:
        # (rounded down: 0.97 s said as "1.0 s" read as enough)
        what = "silent" if speech == 0 else f"too short ({math.floor(speech * 10) / 10:.1f} s of sound)"
        raise InvalidReference(
            f"voice reference is {what}; send at least {limits.min_speech_seconds:g} s of clear speech "
            f"(5 to 15 s works best, at most {limits.max_seconds:g} s)",
            param,
        )
    audio = trim_silence(audio, pad_seconds=TRIM_PAD_SECONDS)
    if audio.duration > limits.max_seconds + 2 * TRIM_PAD_SECONDS:
        raise InvalidReference(
            f"voice reference is {audio.duration:.1f} s long once the silence at its ends is trimmed; at "
            f"most {limits.max_seconds:g} s is taken: send a shorter clip (5 to 15 s works best)",
            param,
        )
    key = hashlib.sha256(audio.samples.tobytes()).hexdigest()
    if transcript is not None:
        transcript = transcript_text(transcript)
        # (The faults are the text's, not the clip's: their codes say so.)
        if not speakable(transcript):  # zero-width or control characters: paired with the clip as no words
            invisible = "holds only invisible characters (zero-width or control ones)"
            what = "is empty" if not transcript else invisible
            raise InvalidReference(
                f"the reference transcript {what}; {transcript_fix}", transcript_param,
                "empty_string" if not transcript else "invalid_value",
            )  # fmt: skip
        if len(transcript) > limits.max_transcript_characters:
            raise InvalidReference(
                f"the reference transcript has {len(transcript)} characters; at most "
                f"{limits.max_transcript_characters} are taken (the words of the clip, nothing more)",
                transcript_param,
                "string_above_max_length",
            )
    return Reference(audio, key, transcript)


async def recognised_words(recognizer: AsyncTranscriber | None, audio: Audio, param: str) -> str:
    """What ``audio`` says, by speech recognition; ``InvalidRequest`` naming ``param`` (the field where the
    words go) when it is off."""
    if recognizer is None:
        raise InvalidRequest(
            f"speech recognition is turned off on this server; give the words spoken in {param}", param
        )
    transcript = await recognizer.transcribe(audio)
    return transcript.text


@dataclass
class _Making(Generic[V]):
    """A value being made for a ``ReferenceCache``, and how many callers wait for it."""

    task: asyncio.Task[V]
    callers: int = 0


class ReferenceCache(Generic[V]):
    """A small LRU keyed by a reference's content hash (its audio codes, or its recognised transcript).

    Clients resend the same reference with every request; encoding or recognising it again would cost a
    tokenizer pass or a Whisper run. ``get_or_make`` makes a value once for the requests that ask for it at
    the same time (an app that speaks a text's sentences in parallel sends the reference with each).
    """

    def __init__(self, capacity: int = 64):
        self._capacity = capacity
        self._items: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()
        self._making: dict[str, _Making[V]] = {}  # (on the event loop)

    async def get_or_make(self, key: str, make: Callable[[], Awaitable[V]]) -> V:
        """The value for ``key``: cached, or made by ``make`` once for every caller meanwhile. A caller
        that is cancelled (its client left) leaves the making to the others, and the value is cached for
        them; when none is left, the making is cancelled too (an abandoned reference would hold up the
        codec's line). A failure is every waiting caller's."""
        value = self.get(key)
        if value is not None:
            return value
        making = self._making.get(key)
        if making is None:
            making = self._making[key] = _Making(asyncio.ensure_future(self._make(key, make)))
            making.task.add_done_callback(lambda done: self._made(key, done))
        making.callers += 1
        try:
            return await asyncio.shield(making.task)
        except asyncio.CancelledError:
            if making.callers == 1:  # the last one waiting
                making.task.cancel()
                if self._making.get(key) is making:  # a caller from now on makes it anew
                    del self._making[key]
            raise
        finally:
            making.callers -= 1

    async def _make(self, key: str, make: Callable[[], Awaitable[V]]) -> V:
        value = await make()
        self.put(key, value)
        return value

    def _made(self, key: str, task: asyncio.Task[V]) -> None:
        if (making := self._making.get(key)) is not None and making.task is task:
            del self._making[key]
        if not task.cancelled():
            task.exception()  # (retrieved: a failure whose callers all left is not logged as unretrieved)

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


# A system message that already is a Higgs system prompt (as Boson's own examples send it) is used as it is.
_HIGGS_SYSTEM_MARKERS = ("Generate audio following instruction.", "<|scene_desc_start|>")


def system_turn(scene: str) -> Turn:
    """The Higgs system prompt with a scene description (or ``scene`` itself when it already is one)."""
    if any(marker in scene for marker in _HIGGS_SYSTEM_MARKERS):
        return Turn("system", scene.strip())
    return Turn("system", SYSTEM_TEMPLATE.format(scene=scene.strip()))


def clone_turns(scene: str, transcript: str, codes: AudioCodes, text: str) -> list[Turn]:
    """The in-context cloning prompt: scene, the reference said by the "assistant", then the text to speak."""
    return [system_turn(scene), Turn("user", transcript), Turn("assistant", audio=codes), Turn("user", text)]
