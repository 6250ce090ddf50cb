"""Stored voices: the library on disk, OpenAI's built-in voice names, and resolving a name to a prompt.

A voice is ``default`` (Higgs' own, unconditioned) or a stored voice: a clip and its transcript in the
voices folder, by name or id. OpenAI's built-in names (``BUILTIN_VOICES``) are stored voices too, made by
the model the first time one is used and cloned from ever after. ``Voices`` is what the routes and the
planner use: it serialises the library's writers, transcribes an uploaded clip once (the transcript is
stored with it) and caches each voice's audio codes on disk. No HTTP knowledge: failures are domain errors
(``VoiceNotFound``, ``VoiceExists``, ...) that ``errors.py`` maps to statuses.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from audio import Audio, active_speech_seconds, decoding, trim_silence
from generation import AudioCodes, Engine, GenerationRequest, Turn
from protocol import InvalidRequest
from settings import Settings
from stt import AsyncTranscriber
from voice_cloning import (
    InvalidReference,
    Reference,
    ReferenceLimits,
    check_reference,
    clone_turns,
    recognised_words,
    reference_from_bytes,
    system_turn,
    transcript_text,
)

log = logging.getLogger(__name__)

DEFAULT_VOICE = "default"
CLONE_VOICE = "clone"  # chat only: the voice of the request's own input_audio reference
NAMES_SAID = 24  # the voices an unknown voice's 400 names at most

# OpenAI's built-in voice names. Each is a stored voice: the library's voice of that name when there is
# one; otherwise, on first use, the model speaks BUILTIN_SENTENCE with this speaker description and a seed
# derived from the name, and the clip is stored (marked built-in) and cloned from ever after, so the voice
# is the same on every request. A description alone would give a new timbre for every text.
BUILTIN_VOICES: dict[str, str] = {
    "alloy": "a calm adult voice, neutral and balanced, clear diction",
    "ash": "a male voice, relaxed and slightly husky",
    "ballad": "a male voice, soft and warm, like a storyteller",
    "coral": "a female voice, bright and friendly",
    "echo": "a male voice, deep and resonant",
    "fable": "a male voice with a British accent, expressive",
    "nova": "a young female voice, energetic and clear",
    "onyx": "a male voice, low and authoritative",
    "sage": "a female voice, calm and thoughtful",
    "shimmer": "a female voice, light and gentle",
    "verse": "a male voice, lively and articulate",
    "marin": "a female voice, smooth and professional",
    "cedar": "a male voice, warm and grounded",
}
BUILTIN_SENTENCE = (
    "Hello, it is nice to meet you. I will read your text in this voice, clearly and at an even pace."
)

# Output tokens of an audio answer that are not heard: the stream's begin marker, the delay pattern's 7
# extra columns (8 codebooks) and the column that ends the stream (a cut stream's last frame).
AUDIO_TOKEN_MARGIN = 9


def audio_token_cap(frame_rate: float, seconds: float) -> int:
    """Output tokens for ``seconds`` of audio: a stream cut there holds ``seconds`` of audio (to the frame
    below), and one that ends by itself within them ends before the cap."""
    return int(frame_rate * seconds) + AUDIO_TOKEN_MARGIN


def builtin_seed(name: str) -> int:
    """The fixed seed a built-in voice is made with."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


@dataclass(frozen=True)
class VoicePrompt:
    """What a voice adds to the prompt: a reference (transcript and codes), or nothing (default voice)."""

    name: str
    transcript: str | None = None
    codes: AudioCodes | None = None

    def turns(self, scene: str, text: str) -> list[Turn]:
        """The prompt that speaks ``text`` in this voice."""
        if self.codes is None or self.transcript is None:
            return [system_turn(scene), Turn("user", text)]
        return clone_turns(scene, self.transcript, self.codes, text)


VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # (whole: ``fullmatch``; "$" let "nl\n" by)
RESERVED_NAMES = frozenset({CLONE_VOICE, DEFAULT_VOICE})
NAME_RULE = (
    "a voice name is 1 to 64 ASCII letters, digits, '_', '-' or '.', starting with a letter or digit, "
    "without '..'"
)
ID_PREFIX = "voice_"


def canonical_voice(name: str) -> str:
    """``name`` as this server spells its own voices: ``default``, ``clone`` and OpenAI's built-in names in
    lower case, whatever the case they were sent in (as stored voices are matched: ``VoiceLibrary.get``);
    any other name as it is."""
    lower = name.lower()
    return lower if lower in RESERVED_NAMES or lower in BUILTIN_VOICES else name


META_DIR = ".voices"
# Held (flock) by whoever writes the library, in any process on any machine that shares the folder.
LOCK_FILE = ".lock"
# ``np.load`` parses an .npy header with ``ast.literal_eval``, which CPython 3.11 can fail in threads that
# parse at once ("SystemError: AST constructor recursion depth mismatch", python/cpython#106905): seen
# once in the tests, with two requests loading stored voices' codes together. The loads take turns.
_NPY_LOAD = threading.Lock()


class VoiceExists(ValueError):
    """A voice of that name is already stored."""


class VoiceQuotaExceeded(ValueError):
    """The library is full (count or bytes); ``param`` names the request field that needed the room."""

    def __init__(self, message: str, param: str = "audio_sample"):
        super().__init__(message)
        self.param = param


class VoiceNotFound(LookupError):
    """No stored voice has that name or id; ``param`` names the request field that named it."""

    def __init__(self, message: str, param: str = "voice_id"):
        super().__init__(message)
        self.param = param


class VoiceChanged(VoiceNotFound):
    """A voice's clip was replaced or removed (by another request or process) while it was being read."""


class InvalidVoiceName(ValueError):
    """A name that cannot name a stored voice; the message says why."""


class BuiltinVoiceFailed(RuntimeError):
    """The model made no usable clip for a built-in voice (a server fault, not the client's)."""


@dataclass(frozen=True)
class Voice:
    """A stored voice: ``NAME.wav`` + ``NAME.txt`` in the voices folder (as Higgs publishes voice prompts)."""

    id: str
    name: str
    transcript: str
    created_at: int
    builtin: bool
    duration: float
    bytes: int
    digest: str = field(default="", repr=False)
    """Content hash of the clip as read; its cached codes are stored and looked up under it."""
    by_hand: bool = field(default=False, repr=False)
    """Placed in the folder by hand (no metadata): its clip is checked as an upload is, then encoded."""

    def public(self) -> dict:
        """The voice as the API shows it."""
        return {
            "id": self.id,
            "object": "audio.voice",
            "type": "audio_sample",
            "name": self.name,
            "transcript": self.transcript,
            "created_at": self.created_at,
            "duration": round(self.duration, 3),
            "builtin": self.builtin,
        }


def already_exists(stored: Voice | None, name: str) -> str:
    """Why ``name`` cannot be stored: ``stored`` (or a file) has it. A built-in voice's clip was made by the
    server on that name's first use, so the message says whose it is and how to put one's own in its place."""
    if stored is not None and stored.builtin:
        return (
            f"voice {stored.name!r} already exists: the server made its clip when the name was first used; "
            f"to store your own clip under that name, delete it first (DELETE /v1/audio/voices/{stored.name})"
        )
    if stored is not None and stored.name != name:  # one name regardless of case: say the stored one's case
        return (
            f"a voice named {stored.name!r} already exists (names are the same whatever their case); delete "
            "it first or pick another name"
        )
    return f"a voice named {name!r} already exists; delete it first or pick another name"


def check_voices_dir(folder: Path) -> None:
    """Refuse a voices folder that cannot hold voices (a file, or one this process cannot write), before
    the models load: it was found after them (minutes with real weights), and every call then answered
    that the models could not be loaded (an operator's trial)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RuntimeError(
            f"HIGGS_VOICES_DIR {str(folder)!r} cannot hold voices ({exc.strerror or exc}); give a folder "
            "this process can write"
        ) from None


def voice_id(name: str) -> str:
    """A voice's stable id, derived from its name (so hand-placed voices have one too)."""
    return ID_PREFIX + hashlib.sha256(name.encode()).hexdigest()[:20]


def check_voice_name(name: str) -> str:
    """Return ``name`` if it can name a stored voice, else raise ``InvalidVoiceName`` saying why."""
    if not VOICE_NAME.fullmatch(name) or ".." in name:
        raise InvalidVoiceName(NAME_RULE)
    if name.lower() in RESERVED_NAMES:
        raise InvalidVoiceName(f"{name!r} is reserved; choose another name")
    if name.lower().startswith(ID_PREFIX):
        raise InvalidVoiceName(f"names starting with {ID_PREFIX!r} are voice ids; choose another name")
    return name


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class VoiceLibrary:
    """Voices stored under one folder; survives restarts and crashes.

    Layout: ``NAME.wav`` (24 kHz mono 16-bit) and ``NAME.txt`` (its transcript), as Higgs publishes its voice
    prompts, so the folder can be filled by hand; ``.voices/NAME.json`` (metadata) and
    ``.voices/NAME.<audio hash>.npy`` (cached audio codes). A create or delete first writes the marker
    ``.voices/NAME.pending``, then its files one by one, each atomically (temporary file + rename), the
    metadata last, and removes the marker; at start-up ``recover`` finishes or undoes whatever a crash
    interrupted, and removes temporary files. Methods are synchronous and cheap.

    Several processes (replicas, on one machine or several sharing the folder) may use one library: every
    write holds an exclusive ``flock`` on ``.voices/.lock``, every read goes to the disk (a voice stored or
    deleted by one process is seen by all at once), and audio codes are cached under the clip's content hash
    and only while that clip is the voice's, so they never outlive or mismatch their voice.
    """

    def __init__(self, root: Path, *, max_voices: int = 100, max_bytes: int = 200 * 1024 * 1024):
        self.root = Path(root)
        self.meta = self.root / META_DIR
        self.max_voices = max_voices
        self.max_bytes = max_bytes
        self.meta.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._digests: dict[str, tuple[tuple[int, ...], str]] = {}
        self._warned: set[str] = set()  # what ``warn_once`` has logged
        self.recover()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive right to write the library, across threads and processes (released if one dies)."""
        with self._lock:
            if not self.meta.is_dir():  # removed while serving: the voices in it are gone, the library is not
                # named as it went: the library's whole folder, or only its .voices
                gone = self.meta if self.root.is_dir() else self.root
                log.warning("the voices folder %s is gone; making it again", gone)
                self.meta.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.meta / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    # ---- reading ----

    def _files(self, name: str) -> tuple[Path, Path, Path]:
        return self.root / f"{name}.wav", self.root / f"{name}.txt", self.meta / f"{name}.json"

    def _load(self, name: str) -> Voice | None:
        wav, txt, meta_path = self._files(name)
        if (self.meta / f"{name}.pending").exists() or not wav.is_file():
            return None  # (being written or deleted: a write keeps its marker until its metadata is there)
        if not txt.is_file():
            self.warn_once("voice file %s.wav ignored: it needs %s.txt beside it (its words)", name, name)
            return None
        by_hand = not meta_path.is_file()
        try:
            meta = {} if by_hand else json.loads(meta_path.read_text())
            info = sf.info(str(wav))
            digest = self._digest(wav)
            transcript = txt.read_text(encoding="utf-8")
            stat = wav.stat()
        except FileNotFoundError:  # deleted by another request or process while being read
            return None
        except (RuntimeError, ValueError) as error:  # (soundfile's errors; not UTF-8; bad JSON)
            self.warn_once("voice %s ignored: its files cannot be read (%s)", name, error)
            return None
        if info.frames == 0:
            self.warn_once("voice %s ignored: its files cannot be read (%s)", name, "no samples")
            return None
        return Voice(
            id=voice_id(name),
            name=name,
            transcript=transcript_text(transcript),
            created_at=int(meta.get("created_at", stat.st_mtime)),
            builtin=bool(meta.get("builtin", False)),
            duration=float(info.duration),
            bytes=stat.st_size,
            digest=digest,
            by_hand=by_hand,
        )

    def warn_once(self, message: str, *args: object) -> None:
        """Log a warning about files placed by hand once, not at every list or use."""
        line = message % args
        if line not in self._warned:
            self._warned.add(line)
            log.warning(line)

    def _names(self) -> dict[str, str]:
        """The stored names by their lower case: names are unique regardless of case, so of clips placed
        by hand whose names differ only in case the first in sorted order is the voice (the others are
        ignored, logged)."""
        names: dict[str, str] = {}
        stems = sorted(p.stem for p in self.root.glob("*.wav") if not p.name.startswith("."))
        for stem in stems:
            try:  # the rules an upload's name follows: a reserved name or an id's form is no voice's
                check_voice_name(stem)
            except InvalidVoiceName as exc:
                self.warn_once("voice file %s.wav ignored: %s", stem, exc)
                continue
            kept = names.setdefault(stem.lower(), stem)
            if kept != stem:
                self.warn_once("voice file %s.wav ignored: its name is %s.wav's but for case", stem, kept)
        return names

    def list(self) -> list[Voice]:
        """Every complete voice, by name."""
        return [v for v in (self._load(n) for n in self._names().values()) if v is not None]

    def get(self, name_or_id: str) -> Voice | None:
        """A voice by id, or by name in any case (names are unique regardless of case)."""
        if name_or_id.startswith(ID_PREFIX):
            return next((v for v in self.list() if v.id == name_or_id), None)
        if not VOICE_NAME.fullmatch(name_or_id) or ".." in name_or_id:
            return None
        stored = self._names().get(name_or_id.lower())
        return self._load(stored) if stored is not None else None

    def _digest(self, wav: Path) -> str:
        """The clip's content hash; hashed again only when the file changed (a rewrite is a new inode)."""
        stat = wav.stat()
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        known = self._digests.get(wav.stem)
        if known is not None and known[0] == key:
            return known[1]
        digest = hashlib.sha256(wav.read_bytes()).hexdigest()[:16]
        self._digests[wav.stem] = (key, digest)
        return digest

    def _is_current(self, voice: Voice) -> bool:
        """Whether ``voice`` is still stored with the clip it was read with."""
        current = self._load(voice.name)
        return current is not None and current.digest == voice.digest

    def audio(self, voice: Voice) -> Audio:
        """The voice's clip; ``VoiceChanged`` when it is no longer the clip ``voice`` was read with."""
        try:
            data = self._files(voice.name)[0].read_bytes()
        except FileNotFoundError:
            raise VoiceChanged(f"voice {voice.name!r} was deleted") from None
        if hashlib.sha256(data).hexdigest()[:16] != voice.digest:
            raise VoiceChanged(f"voice {voice.name!r} was replaced")
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return Audio(samples.mean(axis=1), rate)

    def _codes_path(self, voice: Voice) -> Path:
        return self.meta / f"{voice.name}.{voice.digest}.npy"

    def codes(self, voice: Voice) -> AudioCodes | None:
        """The cached audio codes of the voice's clip, if computed and the clip is still the voice's."""
        try:
            with _NPY_LOAD:
                codes = np.load(self._codes_path(voice))
        except FileNotFoundError:
            return None
        if not self._is_current(voice):
            return None
        return AudioCodes(torch.from_numpy(codes.astype(np.int64)))

    def save_codes(self, voice: Voice, codes: AudioCodes) -> None:
        """Cache a voice's audio codes next to it, unless the voice was deleted or replaced meanwhile."""
        with self._locked():
            if self._is_current(voice):
                self._write_codes(voice, codes)

    def _write_codes(self, voice: Voice, codes: AudioCodes) -> None:
        buf = io.BytesIO()
        np.save(buf, codes.codes.numpy().astype(np.int16))
        _write_atomic(self._codes_path(voice), buf.getvalue())

    # ---- writing ----

    def create(
        self, name: str, audio: Audio, transcript: str, codes: AudioCodes | None = None, builtin: bool = False
    ) -> Voice:
        """Store a new voice; raises ``VoiceExists`` or ``VoiceQuotaExceeded``, writing nothing then."""
        check_voice_name(name)
        buf = io.BytesIO()
        sf.write(buf, audio.samples, audio.sample_rate, format="WAV", subtype="PCM_16")
        wav_bytes = buf.getvalue()
        with self._locked():
            voices = self.list()
            stored = next((v for v in voices if v.name.lower() == name.lower()), None)
            if stored is not None or self._files(name)[0].exists():
                raise VoiceExists(already_exists(stored, name))
            self._check_room(voices, len(wav_bytes))
            wav, txt, meta = self._files(name)
            marker = self.meta / f"{name}.pending"
            _write_atomic(marker, b"create")
            _write_atomic(wav, wav_bytes)
            _write_atomic(txt, transcript.encode("utf-8"))
            voice = Voice(
                id=voice_id(name),
                name=name,
                transcript=transcript,
                created_at=int(time.time()),
                builtin=builtin,
                duration=audio.duration,
                bytes=len(wav_bytes),
                digest=hashlib.sha256(wav_bytes).hexdigest()[:16],
            )
            if codes is not None:
                self._write_codes(voice, codes)
            _write_atomic(meta, json.dumps({"created_at": voice.created_at, "builtin": builtin}).encode())
            marker.unlink()
        return voice

    def check_room(self, param: str, new_bytes: int = 0) -> None:
        """``VoiceQuotaExceeded`` (naming ``param``) unless one more voice of ``new_bytes`` fits."""
        self._check_room(self.list(), new_bytes, param)

    def _check_room(self, voices: list[Voice], new_bytes: int, param: str = "audio_sample") -> None:
        what = "delete a voice (DELETE /v1/audio/voices/{name}) or raise"
        if len(voices) >= self.max_voices:
            raise VoiceQuotaExceeded(
                f"the voice library is full ({self.max_voices} voices); {what} HIGGS_MAX_VOICES", param
            )
        if sum(v.bytes for v in voices) + new_bytes > self.max_bytes:
            raise VoiceQuotaExceeded(
                f"the voice library is full ({self.max_bytes / 1e6:g} MB of audio); {what} "
                "HIGGS_MAX_VOICE_LIBRARY_MB",
                param,
            )

    def delete(self, name_or_id: str) -> bool:
        """Remove a voice; False if there is none of that name or id."""
        with self._locked():
            voice = self.get(name_or_id)
            if voice is None:
                return False
            marker = self.meta / f"{voice.name}.pending"
            _write_atomic(marker, b"delete")
            self._remove(voice.name)
            marker.unlink()
        return True

    def _remove(self, name: str) -> None:
        # Its codes are NAME.<hash>.npy; the pattern also matches another voice's, NAME.b.<hash>.npy.
        found = self.meta.glob(f"{glob.escape(name)}.*.npy")
        codes = [p for p in found if "." not in p.name[len(name) + 1 : -4]]
        for path in (*self._files(name), *codes):
            path.unlink(missing_ok=True)
        self._digests.pop(name, None)  # (else every name ever stored stays, for the process's life)

    def recover(self) -> None:
        """Finish or undo what a crash interrupted, and remove temporary files.

        Under the lock, so that a process starting beside a running one never undoes a write in progress.
        """
        with self._locked():
            for tmp in [*self.root.glob(".tmp-*"), *self.meta.glob(".tmp-*")]:
                tmp.unlink(missing_ok=True)
            for marker in self.meta.glob("*.pending"):
                name = marker.name.removesuffix(".pending")
                if marker.read_bytes() == b"delete" or not self._files(name)[2].is_file():
                    log.warning("voice %r: removing what an interrupted write left", name)
                    self._remove(name)
                marker.unlink()


class Voices:
    """The voice library as the service uses it: find, make, store and remove voices.

    Writers (create, delete, making a built-in voice) hold one lock, so that two requests cannot store the
    same name at once; every file operation runs off the event loop.
    """

    def __init__(
        self, settings: Settings, engine: Engine, recognizer: AsyncTranscriber | None, library: VoiceLibrary
    ):
        self.settings = settings
        self.engine = engine
        self.recognizer = recognizer
        self.library = library
        self.limits = ReferenceLimits.from_settings(settings, engine.sample_rate)
        self._lock = asyncio.Lock()
        # One lock per built-in name being made: making one is a whole generation, during which the
        # library's writers (create, delete) must not wait.
        self._making: dict[str, asyncio.Lock] = {}
        # The names of uploads being checked and encoded (lower case): a second upload of one is refused
        # at once, not after encoding its clip as well.
        self._creating: set[str] = set()

    def names(self) -> list[str]:
        """Every voice name a request may use, once: a stored voice under an OpenAI name in another case
        (``Nova``) is that name's voice, and the list had both."""
        stored = [v.name for v in self.library.list()]
        taken = {name.lower() for name in stored}
        return sorted({DEFAULT_VOICE, *stored, *(name for name in BUILTIN_VOICES if name not in taken)})

    async def list(self) -> list[Voice]:
        """Every stored voice."""
        return await asyncio.to_thread(self.library.list)

    async def get(self, name_or_id: str) -> Voice:
        """A stored voice by name or id; ``VoiceNotFound`` when there is none."""
        voice = await asyncio.to_thread(self.library.get, name_or_id)
        if voice is None:
            raise VoiceNotFound(f"no voice {name_or_id!r}")
        return voice

    async def resolve_or_make(self, name: str, param: str) -> VoicePrompt:
        """What voice ``name`` (or id) adds to a prompt. A built-in name not stored yet is made first: a whole
        generation, once. ``InvalidRequest`` naming the voices there are when the name is unknown."""
        name = canonical_voice(name)
        if name == DEFAULT_VOICE:
            return VoicePrompt(DEFAULT_VOICE)
        stored = await asyncio.to_thread(self.library.get, name)
        if stored is None and name in BUILTIN_VOICES:
            stored = await self.make_builtin(name, param)
        if stored is None:
            every = self.names()
            names = ", ".join(every[:NAMES_SAID])
            everything = ""
            if len(every) > NAMES_SAID:  # (a large library's list was the whole message)
                names += f", and {len(every) - NAMES_SAID} more"
                everything = "; GET /v1/audio/voices lists them all"
            if name == CLONE_VOICE:
                raise InvalidRequest(
                    "voice 'clone' clones the input_audio reference of a chat completion "
                    f"(/v1/chat/completions); here choose a voice: {names}",
                    param,
                )
            raise InvalidRequest(
                f"unknown voice {name!r}; available voices: {names} (and, in chat, clone){everything}",
                param,
                code="voice_not_found",
            )
        return VoicePrompt(stored.name, stored.transcript, await self._codes(stored, param))

    async def _codes(self, voice: Voice, param: str) -> AudioCodes:
        """A stored voice's codes: from disk when cached there, else encoded once and cached.

        A voice deleted while this runs: what was read is used (the request finishes with it), and a clip
        that was gone before it could be read is ``VoiceNotFound``.
        """
        codes = await asyncio.to_thread(self.library.codes, voice)
        if codes is not None:
            return codes
        try:
            audio = await asyncio.to_thread(self.library.audio, voice)
        except VoiceChanged as exc:
            raise VoiceChanged(f"{exc}; send the request again", param) from None
        if voice.by_hand:
            audio = await asyncio.to_thread(self._checked_by_hand, voice, audio, param)
        codes = await self.engine.encode(audio)
        # Kept only while the clip is still the voice's (a voice deleted meanwhile keeps nothing).
        await asyncio.to_thread(self.library.save_codes, voice, codes)
        return codes

    def _checked_by_hand(self, voice: Voice, audio: Audio, param: str) -> Audio:
        """A clip placed by hand, checked as an upload is (enough speech, not too long once trimmed, a
        transcript) and trimmed as one is; a 400 naming the files to replace, and a warning, when it fails.
        (Nothing is cached for a clip that fails: it is checked again once its files are replaced.)"""
        fix = f"write in {voice.name}.txt the words spoken in {voice.name}.wav"  # (it cannot be left out)
        try:
            return check_reference(audio, voice.transcript, self.limits, param, param, fix).audio
        except InvalidReference as exc:
            self.library.warn_once("voice %s cannot be used: %s", voice.name, exc)
            raise InvalidRequest(
                f"voice {voice.name!r} cannot be used until its files are replaced ({voice.name}.wav and "
                f"{voice.name}.txt were placed in the voices folder by hand, and are checked as an upload "
                f"is): {exc}",
                param,
            ) from None

    async def make_builtin(self, name: str, param: str = "voice") -> Voice:
        """Generate built-in voice ``name``'s clip and store it (unless another request just did).

        The library's room is checked first, so that a full library costs no generation.
        """
        async with self._making.setdefault(name, asyncio.Lock()):
            stored = await asyncio.to_thread(self.library.get, name)
            if stored is not None:
                return stored
            await asyncio.to_thread(self.library.check_room, param)
            log.info("making built-in voice %r (first use)", name)
            s = self.settings
            scene = f"{s.default_scene}\n\nSPEAKER0: {BUILTIN_VOICES[name]}"
            request = GenerationRequest(
                turns=[system_turn(scene), Turn("user", BUILTIN_SENTENCE)],
                audio_output=True,
                max_new_tokens=audio_token_cap(self.engine.frame_rate, s.builtin_voice_seconds),
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                seed=builtin_seed(name),
                ras_window=s.ras_window,
                time_limit=s.generation_timeout_seconds,
            )
            result = await self.engine.generate(request)
            if result.audio is None or active_speech_seconds(result.audio) < s.min_reference_seconds:
                raise BuiltinVoiceFailed(f"the model did not produce a usable clip for voice {name!r}")
            audio = trim_silence(result.audio)
            codes = await self.engine.encode(audio)
            async with self._lock:
                try:
                    return await asyncio.to_thread(
                        self.library.create, name, audio, BUILTIN_SENTENCE, codes, True
                    )
                except VoiceExists:
                    # Another process sharing the library stored it meanwhile: that clip is the voice.
                    stored = await asyncio.to_thread(self.library.get, name)
                    if stored is None:
                        raise
                    return stored

    async def create(self, name: str, data: bytes, transcript: str | None) -> Voice:
        """Store an uploaded voice: validated, transcribed when no transcript is given, and encoded, all
        before anything is written."""
        check_voice_name(name)
        if (stored := await asyncio.to_thread(self.library.get, name)) is not None:
            raise VoiceExists(already_exists(stored, name))
        if name.lower() in self._creating:
            raise VoiceExists(f"a voice named {name!r} is being created by another request")
        self._creating.add(name.lower())
        try:
            return await self._create(name, data, transcript)
        finally:
            self._creating.discard(name.lower())

    async def _create(self, name: str, data: bytes, transcript: str | None) -> Voice:
        reference = await decoding(
            reference_from_bytes, data, transcript, self.limits, "audio_sample", "transcript"
        )
        if reference.transcript is None:
            text = await recognised_words(self.recognizer, reference.audio, "transcript")
            if not text:
                raise InvalidReference(
                    "no speech was found in the sample; send a clip of clear speech or give its transcript",
                    "audio_sample",
                )
            reference = Reference(reference.audio, reference.key, text)
        codes = await self.engine.encode(reference.audio)
        async with self._lock:
            return await asyncio.to_thread(
                self.library.create, name, reference.audio, reference.transcript, codes
            )

    async def delete(self, name_or_id: str) -> Voice:
        """Remove a stored voice; ``VoiceNotFound`` when there is none."""
        async with self._lock:
            voice = await asyncio.to_thread(self.library.get, name_or_id)
            if voice is None or not await asyncio.to_thread(self.library.delete, voice.name):
                raise VoiceNotFound(f"no voice {name_or_id!r}")
        return voice
