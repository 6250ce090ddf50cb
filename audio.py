"""Bytes <-> waveform: decode uploads to mono float32, encode responses.

Knows nothing about HTTP; errors are ``AudioError`` with a message a user can act on. A client's audio is
decoded on threads of its own (``decoding``), never on the event loop.

Decoding tries libsndfile (``soundfile``: wav, flac, ogg/vorbis, ogg/opus, aiff, ...)
first and falls back to FFmpeg through PyAV (mp3, webm, m4a/aac, ...).  Both paths check the
sample rate, channel count and, where the container states it, the duration before any
samples are decoded, and stop decoding as soon as the duration limit is passed otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import functools
import io
import math
import os
import re
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from av.audio.frame import AudioFrame
    from av.audio.resampler import AudioResampler
    from av.container import InputContainer


class AudioError(ValueError):
    """The bytes given are not usable audio; the message says why, for the caller."""


class DecodeStopped(Exception):
    """A decode whose caller set its ``stop`` (the client left): nobody waits for its samples."""


class AudioTooLarge(AudioError):
    """Audio past the size limit (refused before it is decoded)."""


class AudioTooLong(AudioError):
    """Audio past the duration limit; ``seconds`` is its length where its header states it."""

    def __init__(self, message: str, seconds: float | None):
        super().__init__(message)
        self.seconds = seconds


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] and their sample rate."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate


MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 16

MEDIA_TYPES: dict[str, str] = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "pcm16": "audio/pcm",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "aac": "audio/aac",
}
OUTPUT_FORMATS: frozenset[str] = frozenset(MEDIA_TYPES)

_NOT_AUDIO = "the file could not be decoded as audio; send wav, mp3, flac, ogg, opus, webm, m4a or aac"
# Codec priming/padding and container rounding: a clip may decode a little longer than stated.
_DURATION_SLACK_S = 0.1
# Durations guessed from the bit rate may be this far off before the header alone refuses.
_ESTIMATE_MARGIN = 1.5
# Samples read per soundfile block while decoding (frames = this / channels).
_SF_BLOCK_SAMPLES = 1 << 20
# 20 ms analysis frames for the speech-activity helpers; absolute floor for "not silence".
_FRAME_S = 0.02
_ABS_FLOOR_DB = -60.0

# ---------------------------------------------------------------------------------------------
# base64
# ---------------------------------------------------------------------------------------------

_DATA_URL = re.compile(r"^\s*data:[^,]*?;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def _format_mb(n_bytes: int) -> str:
    mb = n_bytes / (1024 * 1024)
    return f"{mb:.3g} MB" if mb < 100 else f"{mb:.0f} MB"


def decode_base64(data: str, *, max_bytes: int | None = None) -> bytes:
    """Decode base64 audio sent by a client.

    Accepts an optional ``data:audio/...;base64,`` prefix, embedded whitespace/newlines,
    missing ``=`` padding and the url-safe alphabet (``-`` and ``_``).  With ``max_bytes``
    the size is checked from the encoded length before anything is decoded.

    Raises:
        AudioError: empty input or not valid base64; ``AudioTooLarge`` past ``max_bytes``.
    """
    if not isinstance(data, str):
        raise AudioError("the audio must be a base64 string")
    match = _DATA_URL.match(data)
    if match:
        data = data[match.end() :]
    elif data.lstrip()[:5].lower() == "data:":
        raise AudioError("the audio data URL is not valid base64: expected 'data:audio/...;base64,...'")
    if _WHITESPACE.search(data):
        data = _WHITESPACE.sub("", data)
    if not data:
        raise AudioError("the audio is empty")
    if max_bytes is not None and len(data.rstrip("=")) * 3 // 4 > max_bytes:
        raise AudioTooLarge(f"the audio is larger than the {_format_mb(max_bytes)} limit")
    data = data.translate(_URLSAFE_TO_STD)
    if not _B64_CHARS.match(data):
        raise AudioError("the audio is not valid base64 (unexpected characters)")
    data = data.rstrip("=")
    if len(data) % 4 == 1:
        raise AudioError("the audio is not valid base64 (truncated data)")
    data += "=" * (-len(data) % 4)
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise AudioError("the audio is not valid base64") from None
    if not decoded:
        raise AudioError("the audio is empty")
    return decoded


_URLSAFE_TO_STD = str.maketrans("-_", "+/")

# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------

# A client's audio (an upload, a reference, a clip to transcribe) is decoded on threads of its own, never on
# the event loop (where a 20-minute clip sent to chat for its words took 2.3 s, every stream's audio stopped
# meanwhile) nor on the default executor's (every streamed answer's audio is encoded there; a burst of long
# uploads would hold them all). At most this many at once: a decode holds a core for its whole length.
DECODE_THREADS = max(2, (os.cpu_count() or 2) // 2)
_DECODES = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")

T = TypeVar("T")


async def decoding(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a decoding thread (in the caller's context: its request id is logged),
    awaited; one waiting its turn is dropped when its caller is cancelled."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_DECODES, call)


def decode_audio(
    data: bytes,
    *,
    target_rate: int | None = None,
    max_seconds: float | None = None,
    format_hint: str | None = None,
    stop: threading.Event | None = None,
) -> Audio:
    """Decode an audio file held in memory to mono float32.

    Supports wav, flac, ogg/vorbis, ogg/opus, mp3, webm/matroska, m4a/mp4 (aac), raw ADTS aac,
    aiff and caf.  Channels are averaged to mono; samples end up in [-1, 1] (float input that
    goes beyond full scale is scaled down, not clipped).  ``target_rate`` resamples the result.

    ``max_seconds`` refuses longer audio: from the header where the container states the
    length (nothing is decoded then), otherwise by stopping once decoding passes the limit.
    ``format_hint`` (an extension or MIME type such as ``"m4a"`` or ``"audio/webm"``) is only
    used when the bytes themselves do not identify the container. Once ``stop`` is set, the decode
    ends at its next block of samples with ``DecodeStopped`` (half an hour of audio takes seconds).

    Raises:
        AudioError: with a message fit to show to the client.
    """
    if not data:
        raise AudioError("the audio is empty")
    if target_rate is not None and not MIN_SAMPLE_RATE <= target_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"target_rate {target_rate} out of range")
    data = bytes(data)

    container = _sniff(data)
    # libsndfile parses a dozen obscure formats too; only hand it the common ones.
    gathered = None
    if container in _SOUNDFILE_CONTAINERS:
        gathered = _decode_soundfile(data, max_seconds, _Gathered(target_rate, stop))
    if gathered is None:
        gathered = _decode_pyav(
            data, max_seconds, container or _hint_demuxer(format_hint), _Gathered(target_rate, stop)
        )
    samples, rate, peak = gathered.finish()
    if samples.size == 0:
        raise AudioError("the audio contains no samples")
    if peak > 1.0:  # (float audio past full scale: scaled down, not clipped)
        samples = samples / np.float32(peak)
    return Audio(samples, rate)


def _check_stream(
    rate: int, channels: int, seconds: float | None, max_seconds: float | None, *, estimated: bool = False
) -> None:
    """Refuse from the stream parameters alone, before anything is decoded.

    ``estimated`` durations (mp3 without a Xing/Info header, raw ADTS aac: guessed from the
    bit rate) only refuse when well over the limit; decoding enforces the exact limit anyway.
    """
    if channels < 1:
        raise AudioError("the audio has no channels")
    if channels > MAX_CHANNELS:
        raise AudioError(f"the audio has {channels} channels; at most {MAX_CHANNELS} are supported")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"the audio sample rate of {rate} Hz is not supported; "
            f"use {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz"
        )
    if max_seconds is not None and seconds is not None:
        limit = max_seconds * (_ESTIMATE_MARGIN if estimated else 1.0) + _DURATION_SLACK_S
        if seconds > limit:
            _too_long(max_seconds, seconds)


def _too_long(max_seconds: float, seconds: float | None = None) -> None:
    got = f" ({seconds:.1f} s)" if seconds is not None else ""
    raise AudioTooLong(
        f"the audio is longer than the {max_seconds:g} s limit{got}; send a shorter clip", seconds
    )


def _limit_samples(rate: int, max_seconds: float | None) -> int | None:
    """Samples per channel past which decoding stops and the clip is refused."""
    if max_seconds is None:
        return None
    return math.floor((max_seconds + _DURATION_SLACK_S) * rate)


def _decode_soundfile(data: bytes, max_seconds: float | None, into: _Gathered) -> _Gathered | None:
    """Decode with libsndfile into ``into``; None if it does not recognise (or cannot start) the file."""
    import soundfile as sf

    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError):
        return None
    with f:
        rate, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
        # frames is exact for wav/flac/ogg; libsndfile reports 0 or a huge value when unknown.
        known = 0 < frames < (1 << 62)
        seconds = frames / rate if known and rate > 0 else None
        _check_stream(rate, channels, seconds, max_seconds, estimated=f.format == "MP3")
        if frames == 0 and f.format in ("WAV", "WAVEX", "RF64", "W64", "AIFF", "FLAC", "CAF"):
            raise AudioError("the audio contains no samples")
        limit = _limit_samples(rate, max_seconds)
        block = max(1024, _SF_BLOCK_SAMPLES // channels)
        try:
            while True:
                chunk = f.read(block, dtype="float32", always_2d=True)
                if len(chunk) == 0:
                    break
                into.add(chunk.mean(axis=1, dtype=np.float32) if channels > 1 else chunk[:, 0], rate)
                if limit is not None and into.total > limit:
                    _too_long(max_seconds or 0.0)
        except (sf.SoundFileError, RuntimeError):
            if into.total == 0:
                return None  # let FFmpeg have a go
        if into.total == 0:
            raise AudioError("the audio contains no samples")
    return into


# Leading bytes -> FFmpeg demuxer.  Sniffing first (rather than letting FFmpeg probe any
# format) keeps playlist/concat-style demuxers that open other resources out of reach.
_HINTS = {
    "wav": "wav",
    "wave": "wav",
    "x-wav": "wav",
    "vnd.wave": "wav",
    "flac": "flac",
    "x-flac": "flac",
    "ogg": "ogg",
    "oga": "ogg",
    "opus": "ogg",
    "vorbis": "ogg",
    "mp3": "mp3",
    "mpeg": "mp3",
    "mpga": "mp3",
    "mpeg3": "mp3",
    "x-mpeg": "mp3",
    "webm": "matroska",
    "mkv": "matroska",
    "mka": "matroska",
    "matroska": "matroska",
    "x-matroska": "matroska",
    "m4a": "mov",
    "mp4": "mov",
    "x-m4a": "mov",
    "mov": "mov",
    "3gp": "mov",
    "3gpp": "mov",
    "aac": "aac",
    "x-aac": "aac",
    "aacp": "aac",
    "adts": "aac",
    "aiff": "aiff",
    "x-aiff": "aiff",
    "aif": "aiff",
    "caf": "caf",
    "x-caf": "caf",
    "amr": "amr",
}
_SOUNDFILE_CONTAINERS = {"wav", "flac", "ogg", "aiff", "caf"}
"""The containers libsndfile decodes. Not mp3: its decoder (mpg123) writes its complaints about frames
that FFmpeg decodes without a word straight to standard error, lines without time or request id between
the log's (26 for one 3-minute mp3 made by ffmpeg); FFmpeg's decode of it is the same to 1.4e-6."""
_ALLOWED_DEMUXERS = {"wav", "w64", "flac", "ogg", "mp3", "aac", "matroska", "webm", "mov", "mp4", "m4a"}
_ALLOWED_DEMUXERS |= {"3gp", "aiff", "caf", "amr", "asf"}


def _sniff(data: bytes) -> str | None:
    """Demuxer name from the first bytes, or None if unrecognised."""
    head = data[:12]
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[4:8] == b"ftyp":
        return "mov"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"caff":
        return "caf"
    if head[:5] == b"#!AMR":
        return "amr"
    offset = 0
    if head[:3] == b"ID3" and len(data) >= 10:
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
        offset = 10 + size + (10 if data[5] & 0x10 else 0)
        if offset + 2 > len(data):
            return "mp3"
    if len(data) >= offset + 2 and data[offset] == 0xFF:
        b1 = data[offset + 1]
        if b1 & 0xF6 == 0xF0:
            return "aac"  # ADTS: sync 0xFFF, layer 00
        if b1 & 0xE0 == 0xE0 and (b1 >> 1) & 0x3 != 0:
            return "mp3"
    if offset:
        return "mp3"
    return None


def _hint_demuxer(format_hint: str | None) -> str | None:
    if not format_hint:
        return None
    hint = format_hint.strip().lower().split(";")[0].strip()
    hint = hint.rsplit("/", 1)[-1].lstrip(".")
    return _HINTS.get(hint)


def _open_container(data: bytes, demuxer: str | None) -> InputContainer:
    """Open with FFmpeg; ``demuxer`` None means probe, restricted to plain audio containers: FFmpeg is told
    to take no other (``format_whitelist``), since opening one may do anything its demuxer does before a
    check after the open could refuse it (a security review: 110 bytes of SDP made the server listen on
    two UDP ports of the sender's choosing, one on every interface, and held a decoding thread for 10 s)."""
    import av

    allowed = {"format_whitelist": ",".join(sorted(_ALLOWED_DEMUXERS))}
    try:
        container = av.open(io.BytesIO(data), mode="r", format=demuxer, options=allowed)
    except (av.FFmpegError, ValueError, OSError, EOFError):
        raise AudioError(_NOT_AUDIO) from None
    if demuxer is None and not set(container.format.name.split(",")) & _ALLOWED_DEMUXERS:
        container.close()
        raise AudioError(_NOT_AUDIO)
    return container


def _frame_to_mono(frame: AudioFrame) -> np.ndarray:
    """Average the channels of a decoded frame to float32 in nominal [-1, 1]."""
    arr = frame.to_ndarray()
    channels = frame.layout.nb_channels
    fmt = frame.format
    if not fmt.is_planar:
        arr = arr.reshape(-1, channels).T
    if arr.dtype == np.uint8:
        arr = (arr.astype(np.float32) - 128.0) / 128.0
    elif arr.dtype == np.int16:
        arr = arr.astype(np.float32) / 32768.0
    elif arr.dtype == np.int32:
        arr = arr.astype(np.float32) / 2147483648.0
    elif arr.dtype == np.int64:
        arr = (arr / 9223372036854775808.0).astype(np.float32)
    else:
        arr = arr.astype(np.float32, copy=False)
    return arr.mean(axis=0, dtype=np.float32) if arr.shape[0] > 1 else arr[0]


def _decode_pyav(data: bytes, max_seconds: float | None, demuxer: str | None, into: _Gathered) -> _Gathered:
    """Decode the first audio stream with FFmpeg (PyAV) into ``into``."""
    import av

    container = _open_container(data, demuxer)
    with container:
        if not container.streams.audio:
            raise AudioError(_NOT_AUDIO)
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        if ctx is None:  # (a header FFmpeg makes no decoder for: a WAV of 0 bits, or float of 16 bits)
            raise AudioError(_NOT_AUDIO)
        # Some streams (e.g. ADTS with channel configuration 0) only tell rate/channels once
        # decoding starts; then the first frame is checked instead.
        rate = int(ctx.sample_rate or 0)
        channels = int(ctx.channels or 0)
        seconds: float | None = None
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration and container.duration > 0:
            seconds = container.duration / 1_000_000
        estimated = bool({"mp3", "aac"} & set(container.format.name.split(",")))
        if rate and channels:
            _check_stream(rate, channels, seconds, max_seconds, estimated=estimated)

        out_rate: int | None = None
        try:
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                if out_rate is None:
                    # Decoders may output another rate than the header says (opus: 48 kHz,
                    # HE-AAC: twice the core rate); the frames are what counts.
                    out_rate = int(frame.sample_rate)
                    _check_stream(out_rate, frame.layout.nb_channels, None, None)
                elif int(frame.sample_rate) != out_rate:
                    raise AudioError("the audio changes sample rate mid-stream; convert it to wav first")
                if frame.layout.nb_channels > MAX_CHANNELS:
                    raise AudioError(f"the audio has more than {MAX_CHANNELS} channels")
                into.add(_frame_to_mono(frame), out_rate)
                limit = _limit_samples(out_rate, max_seconds)
                if limit is not None and into.total > limit:
                    _too_long(max_seconds or 0.0)
        except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
            if isinstance(exc, AudioError):
                raise
            if into.total == 0:
                raise AudioError(_NOT_AUDIO) from None
            # A truncated tail (e.g. an interrupted browser recording): keep what decoded.
        if into.total == 0 or out_rate is None:
            raise AudioError("the audio contains no samples")
    return into


# ---------------------------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------------------------

# Kaiser-windowed sinc, close to librosa/resampy "kaiser_best" but with a shorter filter.
_RESAMPLE_KW = {
    "lowpass_filter_width": 32,
    "rolloff": 0.945,
    "resampling_method": "sinc_interp_kaiser",
    "beta": 14.77,
}
# torchaudio builds a (new/g) x (orig/g + filter) polyphase kernel and spends about new/g
# multiply-adds per input sample; for awkward ratios (e.g. 44099 -> 24000) use FFmpeg's
# resampler instead, which handles any ratio at bounded cost.
_MAX_PHASES = 1_000
_MAX_POLYPHASE = 2_000_000


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample mono float32 samples; deterministic, output length ``ceil(n * new / orig)``."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if orig_rate == new_rate or samples.size == 0:
        return samples
    n_out = math.ceil(len(samples) * new_rate / orig_rate)
    if _torch_resamples(orig_rate, new_rate):
        import torch
        import torchaudio.functional as taf

        with torch.inference_mode():
            out = taf.resample(torch.from_numpy(samples), orig_rate, new_rate, **_RESAMPLE_KW).numpy()
    else:
        out = _resample_ffmpeg(samples, orig_rate, new_rate)
    if len(out) < n_out:
        out = np.pad(out, (0, n_out - len(out)))
    return np.ascontiguousarray(out[:n_out], dtype=np.float32)


def _torch_resamples(orig_rate: int, new_rate: int) -> bool:
    """Whether torchaudio's polyphase filter takes these rates at a bounded cost (else FFmpeg's)."""
    g = math.gcd(orig_rate, new_rate)
    return new_rate // g <= _MAX_PHASES and (orig_rate // g) * (new_rate // g) <= _MAX_POLYPHASE


def _resample_ffmpeg(
    samples: np.ndarray,
    orig_rate: int,
    new_rate: int,
    resampler: AudioResampler | None = None,
    final: bool = True,
) -> np.ndarray:
    """FFmpeg's resampling of ``samples``; ``resampler`` carries on from the samples it was given before (a
    clip fed a block at a time, ``_Gathered``), and ``final`` flushes what it still holds."""
    import av

    resampler = resampler or av.AudioResampler(format="fltp", layout="mono", rate=new_rate)
    out = []
    if len(samples):
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate = orig_rate
        out += resampler.resample(frame)
    if final:
        out += resampler.resample(None)
    return np.concatenate([f.to_ndarray()[0] for f in out]) if out else np.zeros(0, np.float32)


# Native samples resampled at a time while a clip is gathered (44 s at 48 kHz, 5.5 s at 384 kHz): memory
# then grows with the result, not with the source's rate (a 2.6 MB FLAC of 30 min at 384 kHz decoded whole
# held 2.8 GB of samples, and the resampler's working memory on top: 8 GB in all, a hostile-input trial).
# A voice reference (at most 30 s) at up to 48 kHz is one block: resampled at once, as before.
_BLOCK_SAMPLES = 1 << 21


class _Gathered:
    """A clip's mono samples as they are decoded, resampled to ``target_rate`` a block at a time.

    A block's samples equal those of the whole clip resampled at once (to float rounding): each block is
    cut at a whole period of the two rates (``orig/g`` samples in, ``new/g`` out) and resampled with enough
    of its neighbours on both sides to cover the filter's reach, and only its own samples are kept. A clip
    shorter than a block is resampled at once, as it was. Rates torchaudio does not take go through one
    FFmpeg resampler fed block by block. The finite check and the peak are taken as the samples come."""

    def __init__(self, target_rate: int | None, stop: threading.Event | None = None):
        self.target = target_rate
        self.stop = stop
        self.rate: int | None = None
        self.total = 0  # native samples so far
        self.peak = 0.0
        self._done: list[np.ndarray] = []  # at the target rate
        self._pending: list[np.ndarray] = []  # native, not resampled yet
        self._pending_count = 0
        self._history = np.zeros(0, np.float32)  # native samples before the pending ones, as context
        self._ffmpeg: AudioResampler | None = None  # (rates torchaudio does not take)
        self._period = self._phases = self._margin = 0  # (set with the rate, when resampling)

    def add(self, samples: np.ndarray, rate: int) -> None:
        if self.stop is not None and self.stop.is_set():
            raise DecodeStopped
        if self.rate is None:
            self._begin(rate)
        if samples.size == 0:
            return
        if not np.isfinite(samples).all():
            raise AudioError("the audio contains invalid samples (NaN or infinity)")
        self.peak = max(self.peak, float(np.max(np.abs(samples))))
        self.total += len(samples)
        self._pending.append(samples)
        self._pending_count += len(samples)
        if self._resampling and self._pending_count >= _BLOCK_SAMPLES + 2 * self._margin:
            self._resample(final=False)

    def finish(self) -> tuple[np.ndarray, int, float]:
        """The samples (at the target rate when one is given), their rate and the source's peak."""
        if self.rate is None:
            return np.zeros(0, np.float32), self.target or MIN_SAMPLE_RATE, 0.0
        if not self._resampling:
            samples = np.concatenate(self._pending) if self._pending else np.zeros(0, np.float32)
            return np.ascontiguousarray(samples, dtype=np.float32), self.rate, self.peak
        self._resample(final=True)
        samples = np.concatenate(self._done) if self._done else np.zeros(0, np.float32)
        wanted = math.ceil(self.total * self.target / self.rate)
        if len(samples) < wanted:  # (FFmpeg's resampler may end a few samples short)
            samples = np.pad(samples, (0, wanted - len(samples)))
        return np.ascontiguousarray(samples[:wanted], dtype=np.float32), self.target, self.peak

    @property
    def _resampling(self) -> bool:
        return self.target is not None and self.rate is not None and self.target != self.rate

    def _begin(self, rate: int) -> None:
        """The source's rate is known: a block's period (native samples in, samples out) and the context it
        needs on each side (the filter's reach, in whole periods)."""
        self.rate = rate
        if not self._resampling:
            return
        g = math.gcd(rate, self.target)
        self._period, self._phases = rate // g, self.target // g
        reach = math.ceil(
            _RESAMPLE_KW["lowpass_filter_width"]
            * self._period
            / (min(self._period, self._phases) * _RESAMPLE_KW["rolloff"])
        )
        self._margin = self._period * (math.ceil(reach / self._period) + 1)

    def _resample(self, final: bool) -> None:
        pending = np.concatenate(self._pending) if self._pending else np.zeros(0, np.float32)
        if not _torch_resamples(self.rate, self.target):
            import av

            self._ffmpeg = self._ffmpeg or av.AudioResampler(format="fltp", layout="mono", rate=self.target)
            self._done.append(_resample_ffmpeg(pending, self.rate, self.target, self._ffmpeg, final))
            self._pending, self._pending_count = [], 0
            return
        period, margin = self._period, self._margin
        if final and not len(pending):
            return
        if final:
            cut, window = len(pending), pending
        else:
            cut = (len(pending) - margin) // period * period
            if cut <= 0:
                return
            window = pending[: cut + margin]
        out = resample(np.concatenate([self._history, window]), self.rate, self.target)
        skip = len(self._history) // period * self._phases  # (the history's own samples, sent before)
        out = out[skip : skip + math.ceil(cut * self.target / self.rate)]
        self._done.append(out.copy())  # (copies of slices: a view would keep its whole block alive)
        used = pending[:cut]
        self._history = (used if cut >= margin else np.concatenate([self._history, used]))[-margin:].copy()
        rest = pending[cut:].copy()
        self._pending, self._pending_count = ([rest] if len(rest) else []), len(rest)


# ---------------------------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------------------------

# (container, codec, supported rates, bit rate)
_PYAV_FORMATS: dict[str, tuple[str, str, tuple[int, ...], int]] = {
    "mp3": ("mp3", "libmp3lame", (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000), 64_000),
    "opus": ("ogg", "libopus", (8000, 12000, 16000, 24000, 48000), 32_000),
    "aac": (
        "adts",
        "aac",
        (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000),
        64_000,
    ),
}


def pcm16(samples: np.ndarray) -> bytes:
    """Samples as headerless signed 16-bit little-endian PCM (clipped to [-1, 1]; NaN gives 0)."""
    return _to_int16(samples).tobytes()


def _to_int16(samples: np.ndarray) -> np.ndarray:
    x = np.clip(np.nan_to_num(np.asarray(samples, dtype=np.float32)), -1.0, 1.0)
    return np.round(x * 32767.0).astype("<i2")


def encode_audio(audio: Audio, fmt: str) -> bytes:
    """Encode mono audio as ``fmt`` (one of ``OUTPUT_FORMATS``): ``EncoderStream`` fed all of it at once.

    wav/flac are 16-bit at the input rate (with their lengths in the header); pcm/pcm16 are headerless
    signed 16-bit little-endian mono; mp3, opus (in Ogg) and aac (ADTS) go through FFmpeg, resampled to a
    rate the codec supports when needed (opus: 8/12/16/24/48 kHz).  Samples are clipped to [-1, 1] before
    quantising.  Empty audio gives ``b""`` for pcm and a header-only wav.

    Raises:
        AudioError: unknown ``fmt``, or empty audio for a format other than pcm/wav.
    """
    fmt = fmt.lower()
    samples = np.asarray(audio.samples, dtype=np.float32).reshape(-1)
    if samples.size == 0 and fmt in OUTPUT_FORMATS and fmt not in ("pcm", "pcm16", "wav"):
        # FLAC and the FFmpeg muxers write nothing at all for zero samples.
        raise AudioError(f"there is no audio to encode as {fmt}")
    encoder = EncoderStream(fmt, int(audio.sample_rate), whole=True)
    return encoder.feed(samples) + encoder.finish()


def _encode_whole(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """wav or flac with the length in the header: written by libsndfile once all samples are known."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, _to_int16(samples), rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# speech-activity helpers
# ---------------------------------------------------------------------------------------------


def _frame_db(audio: Audio) -> tuple[np.ndarray, int]:
    """Per 20 ms frame RMS in dBFS (last partial frame included) and the frame length."""
    x = np.asarray(audio.samples, dtype=np.float32).reshape(-1)
    hop = max(1, round(audio.sample_rate * _FRAME_S))
    if x.size == 0:
        return np.zeros(0), hop
    n_frames = math.ceil(len(x) / hop)
    padded = np.zeros(n_frames * hop, dtype=np.float64)
    padded[: len(x)] = x
    sq = (padded.reshape(n_frames, hop) ** 2).sum(axis=1)
    lengths = np.full(n_frames, hop, dtype=np.float64)
    lengths[-1] = len(x) - (n_frames - 1) * hop
    rms = np.sqrt(sq / lengths)
    return 20.0 * np.log10(np.maximum(rms, 1e-10)), hop


def _active_frames(audio: Audio, threshold_db: float) -> tuple[np.ndarray, int]:
    db, hop = _frame_db(audio)
    if db.size == 0:
        return np.zeros(0, dtype=bool), hop
    return (db >= db.max() + threshold_db) & (db > _ABS_FLOOR_DB), hop


def active_speech_seconds(audio: Audio, threshold_db: float = -40.0) -> float:
    """Seconds of 20 ms frames loud enough to count as sound.

    A frame counts when its RMS is within ``threshold_db`` (negative) of the loudest frame's
    RMS and above an absolute floor of -60 dBFS.  A silent clip gives 0.0.
    """
    active, hop = _active_frames(audio, threshold_db)
    if not active.any():
        return 0.0
    n = len(audio.samples)
    seconds = int(active[:-1].sum()) * hop
    if active[-1]:
        seconds += n - (len(active) - 1) * hop
    return seconds / audio.sample_rate


def trim_silence(audio: Audio, threshold_db: float = -40.0, pad_seconds: float = 0.1) -> Audio:
    """Strip leading and trailing silence, keeping ``pad_seconds`` of margin on each side.

    Uses the same criterion as :func:`active_speech_seconds`.  A clip with no sound at all is
    returned unchanged.
    """
    active, hop = _active_frames(audio, threshold_db)
    idx = np.flatnonzero(active)
    if idx.size == 0:
        return audio
    pad = max(0, round(pad_seconds * audio.sample_rate))
    start = max(0, int(idx[0]) * hop - pad)
    end = min(len(audio.samples), (int(idx[-1]) + 1) * hop + pad)
    return Audio(np.ascontiguousarray(audio.samples[start:end], dtype=np.float32), audio.sample_rate)


# ---------------------------------------------------------------------------------------------
# tempo
# ---------------------------------------------------------------------------------------------


class TempoStream:
    """Pitch-preserving tempo change (FFmpeg's atempo) applied to audio that arrives in pieces."""

    def __init__(self, speed: float, sample_rate: int):
        if not 0.25 <= speed <= 4.0:
            raise AudioError(f"speed must be between 0.25 and 4.0, got {speed:g}")
        import av.filter

        self.sample_rate = sample_rate
        self._pts = 0
        # One atempo stage is accurate within 0.5-2.0; chain two for the rest of the range.
        stages = [speed] if 0.5 <= speed <= 2.0 else [math.sqrt(speed)] * 2
        self._graph = av.filter.Graph()
        source = self._graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono")
        nodes = [
            source,
            *(self._graph.add("atempo", f"{s:.6f}") for s in stages),
            self._graph.add("abuffersink"),
        ]
        for a, b in zip(nodes, nodes[1:], strict=False):
            a.link_to(b)
        self._graph.configure()

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """Push samples in; returns whatever the filter has ready."""
        import av

        if samples.size == 0:
            return np.zeros(0, np.float32)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.float32)[None, :], format="flt", layout="mono"
        )
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += samples.size
        self._graph.push(frame)
        return self._pull()

    def finish(self) -> np.ndarray:
        """Flush the filter."""
        self._graph.push(None)
        return self._pull()

    def _pull(self) -> np.ndarray:
        import av

        pieces = []
        while True:
            try:
                pieces.append(self._graph.pull().to_ndarray().reshape(-1))
            except (av.error.EOFError, av.error.BlockingIOError):
                break
        return np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------
# streamed encoding
# ---------------------------------------------------------------------------------------------

STREAMABLE_FORMATS = frozenset({"pcm", "pcm16", "wav", "mp3", "opus", "aac"})


def wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as players expect)."""
    unknown = 0xFFFFFFFF
    return (
        b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data" + struct.pack("<I", unknown)
    )  # fmt: skip


class _Collector(io.RawIOBase):
    """A write-only file that hands out what was written since the last ``take``."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


class EncoderStream:
    """Encode audio that arrives in pieces, returning encoded bytes as soon as the encoder has them.

    ``fmt`` is one of ``OUTPUT_FORMATS``. pcm is raw 16-bit; wav is a header for a stream of unknown length
    followed by 16-bit samples (with ``whole=True``, for audio given all at once: a wav with its length in
    the header); mp3, opus (Ogg) and aac (ADTS) go through FFmpeg's encoders as the audio comes
    (``STREAMABLE_FORMATS``), resampled by one stateful resampler when the codec lacks the input rate; flac,
    whose header holds the length, is encoded whole at ``finish``.
    """

    def __init__(self, fmt: str, sample_rate: int, *, whole: bool = False):
        fmt = fmt.lower()
        if fmt not in OUTPUT_FORMATS:
            raise AudioError(
                f"unsupported output format {fmt!r}; use one of {', '.join(sorted(OUTPUT_FORMATS))}"
            )
        self.fmt = fmt
        self.sample_rate = sample_rate
        self._header_sent = False
        self._container = None
        self._resampler = None
        held = fmt not in STREAMABLE_FORMATS or (whole and fmt == "wav")
        self._held: list[np.ndarray] | None = [] if held else None
        if fmt in _PYAV_FORMATS:
            import av

            container_fmt, codec, rates, bit_rate = _PYAV_FORMATS[fmt]
            higher = [r for r in rates if r >= sample_rate]
            self._rate = sample_rate if sample_rate in rates else min(higher) if higher else max(rates)
            if self._rate != sample_rate:
                self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=self._rate)
            self._sink = _Collector()
            # Ogg holds packets until a page fills (a second by default): flush pages every 100 ms instead.
            options = {"page_duration": "100000"} if container_fmt == "ogg" else {}
            self._container = av.open(self._sink, mode="w", format=container_fmt, options=options)
            self._stream = self._container.add_stream(codec, rate=self._rate, layout="mono")
            self._stream.bit_rate = bit_rate
            self._pts = 0

    def feed(self, samples: np.ndarray) -> bytes:
        """Encode the next samples (float32 mono at ``sample_rate``); returns the bytes ready so far."""
        if self._held is not None:
            self._held.append(np.asarray(samples, dtype=np.float32))
            return b""
        if self._container is None:
            head = b""
            if self.fmt == "wav" and not self._header_sent:
                head, self._header_sent = wav_stream_header(self.sample_rate), True
            return head + pcm16(samples)
        if samples.size == 0:
            return b""
        import av

        x = np.clip(np.nan_to_num(samples), -1.0, 1.0).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x), format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        return self._encode(self._resampler.resample(frame) if self._resampler else [frame])

    def _encode(self, frames: list) -> bytes:
        for frame in frames:
            frame.pts = self._pts
            self._pts += frame.samples
            self._container.mux(self._stream.encode(frame))
        return self._sink.take()

    def finish(self) -> bytes:
        """Flush the encoder and close the container; returns the last bytes."""
        if self._held is not None:
            samples = np.concatenate(self._held) if self._held else np.zeros(0, np.float32)
            return _encode_whole(samples, self.sample_rate, self.fmt)
        if self._container is None:
            return wav_stream_header(self.sample_rate) if self.fmt == "wav" and not self._header_sent else b""
        tail = self._encode(self._resampler.resample(None)) if self._resampler else b""
        self._container.mux(self._stream.encode(None))
        self._container.close()
        return tail + self._sink.take()
