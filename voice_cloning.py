"""Voice references: validate a clip, cache its audio codes, build the in-context prompt Higgs was trained on.

A reference is a few seconds of someone speaking plus what they said. Higgs Audio clones a voice when the
prompt shows the model "saying" that clip::

    system:    Generate audio following instruction. <scene description>
    user:      <the reference's transcript>
    assistant: <the reference's audio codes>
    user:      <the text to speak>
    assistant: <|audio_out_bos|> ... generated in the same voice

Everything here that can fail on user input runs on the CPU before any GPU work, and fails with
``InvalidReference`` naming the request field (``param``) to fix. No HTTP knowledge.
"""

from __future__ import annotations

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
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from audio import Audio, AudioError, active_speech_seconds, decode_audio, decode_base64, trim_silence
from engine import SYSTEM_TEMPLATE, AudioCodes, Turn

log = logging.getLogger(__name__)

# The containers and codecs a reference may come in (the ``input_audio.format`` values accepted).
REFERENCE_FORMATS = frozenset({"wav", "mp3", "flac", "ogg", "opus", "webm", "m4a", "mp4", "aac"})


class InvalidReference(ValueError):
    """A voice reference that cannot be used; ``param`` names the request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ReferenceLimits:
    """Bounds on a voice reference."""

    sample_rate: int
    min_speech_seconds: float = 1.0
    max_seconds: float = 30.0
    max_bytes: int = 25 * 1024 * 1024


@dataclass(frozen=True)
class Reference:
    """A validated voice reference: mono audio at the audio tokenizer's rate, and its key for caching."""

    audio: Audio
    key: str
    transcript: str | None = None


def load_reference(
    data: str, fmt: str | None, transcript: str | None, limits: ReferenceLimits, param: str
) -> Reference:
    """Decode and check a base64 reference clip; ``param`` is its request path (``messages[0].content[1]``).

    Refuses, with a message that says what to fix, an unknown format and bad base64, then whatever
    ``reference_from_bytes`` refuses.
    """
    if fmt is not None and fmt.lower() not in REFERENCE_FORMATS:
        raise InvalidReference(
            f"unsupported audio format {fmt!r}; use one of: {', '.join(sorted(REFERENCE_FORMATS))}",
            f"{param}.input_audio.format",
        )
    try:
        raw = decode_base64(data, max_bytes=limits.max_bytes)
    except AudioError as exc:
        raise InvalidReference(f"voice reference: {exc}", f"{param}.input_audio.data") from None
    return reference_from_bytes(
        raw, transcript, limits, f"{param}.input_audio.data", f"{param}.input_audio.transcript"
    )


def reference_from_bytes(
    raw: bytes, transcript: str | None, limits: ReferenceLimits, param: str, transcript_param: str
) -> Reference:
    """Decode and check a reference clip's bytes.

    Refuses bytes that are not audio, empty or header-only files, NaN samples, clips longer than
    ``limits.max_seconds``, clips with less than ``limits.min_speech_seconds`` of non-silent sound, and an
    empty transcript. Leading and trailing silence is trimmed.
    """
    try:
        audio = decode_audio(raw, target_rate=limits.sample_rate, max_seconds=limits.max_seconds)
    except AudioError as exc:
        raise InvalidReference(f"voice reference: {exc}", param) from None
    speech = active_speech_seconds(audio)
    if speech < limits.min_speech_seconds:
        what = "silent" if speech == 0 else f"too short ({speech:.1f} s of sound)"
        raise InvalidReference(
            f"voice reference is {what}; send at least {limits.min_speech_seconds:g} s of clear speech "
            f"(5 to 15 s works best, at most {limits.max_seconds:g} s)",
            param,
        )
    audio = trim_silence(audio)
    key = hashlib.sha256(audio.samples.tobytes()).hexdigest()
    if transcript is not None:
        transcript = " ".join(transcript.split())
        if not transcript:
            raise InvalidReference(
                "the reference transcript is empty; omit it or give the words spoken", transcript_param
            )
    return Reference(audio, key, transcript)


class CodesCache:
    """A small LRU of reference audio codes, keyed by the reference's content hash.

    Clients resend the same reference with every request; encoding it again would cost a tokenizer pass.
    """

    def __init__(self, capacity: int = 64):
        self._capacity = capacity
        self._items: OrderedDict[str, AudioCodes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> AudioCodes | None:
        with self._lock:
            codes = self._items.get(key)
            if codes is not None:
                self._items.move_to_end(key)
            return codes

    def put(self, key: str, codes: AudioCodes) -> None:
        with self._lock:
            self._items[key] = codes
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


def system_turn(scene: str) -> Turn:
    """The Higgs system prompt with a scene description."""
    return Turn("system", SYSTEM_TEMPLATE.format(scene=scene.strip()))


def clone_turns(scene: str, transcript: str, codes: AudioCodes, text: str) -> list[Turn]:
    """The in-context cloning prompt: scene, the reference said by the "assistant", then the text to speak."""
    return [system_turn(scene), Turn("user", transcript), Turn("assistant", audio=codes), Turn("user", text)]


# ---- the voice library on disk ----

VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED_NAMES = frozenset({"clone", "default"})
META_DIR = ".voices"
# Held (flock) by whoever writes the library, in any process on any machine that shares the folder.
LOCK_FILE = ".lock"


class VoiceExists(ValueError):
    """A voice of that name is already stored."""


class VoiceQuotaExceeded(ValueError):
    """The library is full (count or bytes)."""


class VoiceChanged(LookupError):
    """A voice's clip was replaced or removed (by another process) while it was being read."""


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


def voice_id(name: str) -> str:
    """A voice's stable id, derived from its name (so hand-placed voices have one too)."""
    return "voice_" + hashlib.sha256(name.encode()).hexdigest()[:20]


def check_voice_name(name: str) -> str:
    """Return ``name`` if it can name a stored voice, else raise ``ValueError`` saying why."""
    if not VOICE_NAME.match(name) or ".." in name:
        raise ValueError(
            "a voice name is 1 to 64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    if name.lower() in RESERVED_NAMES:
        raise ValueError(f"{name!r} is reserved; choose another name")
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
        self.recover()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive right to write the library, across threads and processes (released if one dies)."""
        with self._lock:
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
        if not (wav.is_file() and txt.is_file()) or (self.meta / f"{name}.pending").exists():
            return None
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            info = sf.info(str(wav))
            digest = self._digest(wav)
            transcript = txt.read_text(encoding="utf-8")
        except FileNotFoundError:  # deleted by another process while being read
            return None
        return Voice(
            id=voice_id(name),
            name=name,
            transcript=" ".join(transcript.split()),
            created_at=int(meta.get("created_at", wav.stat().st_mtime)),
            builtin=bool(meta.get("builtin", False)),
            duration=float(info.duration),
            bytes=wav.stat().st_size,
            digest=digest,
        )

    def list(self) -> list[Voice]:
        """Every complete voice, by name."""
        names = sorted(p.stem for p in self.root.glob("*.wav") if VOICE_NAME.match(p.stem))
        return [v for v in (self._load(n) for n in names) if v is not None]

    def get(self, name_or_id: str) -> Voice | None:
        """A voice by name or id."""
        if name_or_id.startswith("voice_"):
            return next((v for v in self.list() if v.id == name_or_id), None)
        if not VOICE_NAME.match(name_or_id) or ".." in name_or_id:
            return None
        return self._load(name_or_id)

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
        path = self._codes_path(voice)
        try:
            codes = np.load(path)
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
            if any(v.name.lower() == name.lower() for v in voices) or self._files(name)[0].exists():
                raise VoiceExists(
                    f"a voice named {name!r} already exists; delete it first or pick another name"
                )
            if len(voices) >= self.max_voices:
                raise VoiceQuotaExceeded(f"the voice library is full ({self.max_voices} voices)")
            if sum(v.bytes for v in voices) + len(wav_bytes) > self.max_bytes:
                raise VoiceQuotaExceeded(
                    f"the voice library is full ({self.max_bytes / 1e6:g} MB of audio); delete a voice first"
                )
            wav, txt, meta = self._files(name)
            marker = self.meta / f"{name}.pending"
            _write_atomic(marker, b"create")
            _write_atomic(wav, wav_bytes)
            _write_atomic(txt, transcript.encode("utf-8"))
            voice = Voice(
                voice_id(name),
                name,
                transcript,
                int(time.time()),
                builtin,
                audio.duration,
                len(wav_bytes),
                hashlib.sha256(wav_bytes).hexdigest()[:16],
            )
            if codes is not None:
                self._write_codes(voice, codes)
            _write_atomic(meta, json.dumps({"created_at": voice.created_at, "builtin": builtin}).encode())
            marker.unlink()
        return voice

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
        for path in (*self._files(name), *self.meta.glob(f"{glob.escape(name)}.*.npy")):
            path.unlink(missing_ok=True)

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
