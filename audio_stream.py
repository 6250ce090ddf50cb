"""A request's audio while it is generated: its delay-pattern columns cut into pieces for the codec, the
decoded pieces joined into one stream, and the order in which the codec serves the pieces of many streams.

The scheduler thread feeds an ``AudioStream`` one column a step and cuts pieces as they become due; the
codec thread decodes them (``Decode``), ends streams (``End``) and encodes voice references (``Encode``),
taking its work in the order ``next_codec_work`` gives.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from audio import Audio
from generation import AudioCodes, AudioPiece, GenerationResult, StreamSettings


@dataclass(frozen=True)
class Layout:
    """What a stream needs to know of the model and the codec."""

    settings: StreamSettings
    codebooks: int
    codebook_size: int
    sample_rate: int
    frame_rate: int
    end_frames: int = 0
    """The length a stream's last piece is decoded at, where the stream is that long: more of the frames
    already sent go on its left, which only brings its samples nearer the one-shot decode (a sample depends
    on the frames within 10 of its own: ``../shared/HIGGS_DECODING.md``). Every end is then a piece of one
    length, decoded together with the others and from a captured graph (on CUDA: the regular pieces'
    length, ``HiggsEngine``). 0: the last piece is what is left, with its context."""


@dataclass(eq=False)
class Piece:
    """Codes to decode for one piece of a stream, and which of the decoded samples to send."""

    codes: torch.Tensor  # (codebooks, frames), clipped to the codec's range
    start: int
    stop: int
    first: bool  # the stream's first piece


@dataclass(eq=False)
class Decode:
    """For the codec thread: a stream's piece to decode and send."""

    kind: ClassVar[str] = "piece"
    stream: AudioStream
    piece: Piece
    cut_at: float = field(default_factory=time.monotonic)
    """When the scheduler cut it (monotonic): a later piece waits at most ``gather`` from then
    (``codec_due_in``)."""

    @property
    def frames(self) -> int:
        return self.piece.codes.shape[1]


@dataclass(eq=False)
class End:
    """For the codec thread: a stream that ended (what was not cut yet is decoded and sent, then the
    result)."""

    kind: ClassVar[str] = "end"
    stream: AudioStream
    result: GenerationResult

    @property
    def frames(self) -> int:
        """Frames its last piece decodes (``AudioStream.final``), 0 when none is left."""
        return self.stream.final_frames


@dataclass(eq=False)
class Encode:
    """For the codec thread: a voice reference to encode; ``future`` gets its codes."""

    kind: ClassVar[str] = "encode"
    audio: Audio
    future: Future
    context: contextvars.Context


CodecWork = Decode | End | Encode

ENDS_FIRST = 0.5
"""The codec serves the streams whose tokens have ended before the others while every other listener has
this many seconds of audio in hand (``next_codec_work``). A finished stream's last pieces are what its
client still waits for (all of them, for an answer that is not streamed), and a listener far ahead of its
playback loses nothing by waiting a few calls; by the listener who runs out first alone, a stream that had
seconds in hand kept its last pieces waiting behind every newer stream's. A later piece waiting to share a
call (``codec_due_in``) waits only while its listener has this much in hand too."""

GATHER = 0.04
"""Seconds a stream's later piece waits, on CUDA, for other streams' pieces to share its codec call
(``codec_due_in``; ``HIGGS_CODEC_GATHER_MS``). A call replayed from a CUDA graph costs about the same for
one piece as for eight (5 ms on an H200 for 20 frames), and every call runs beside the decoding steps on
the same GPU. Taken as they came, pieces at 16 concurrent went 3.5 to a call (571-583 calls of 5.0-5.4 ms
in 8.6-9.1 s of steps: the codec busy a third of the time while the steps ran 1.12-1.16x as long as
alone); 40 ms is about 10 steps there, in which 16 streams cut about 13 pieces."""


def is_first(item: CodecWork) -> bool:
    """A stream's first piece (a listener waits for sound; on a CPU the decoding loop waits too)."""
    return isinstance(item, Decode) and item.piece.first


def codec_due_in(pending: list[CodecWork], gather: float, full: int | None = None) -> float:
    """Seconds until the codec must take up some of ``pending`` (0: now), for a codec whose calls cost
    about the same whatever their batch (CUDA graphs: ``GATHER``). A stream's later piece may wait up to
    ``gather`` seconds after it was cut, while its listener has ``ENDS_FIRST`` seconds of audio in hand,
    for other streams' pieces to share its call; anything else is due at once (a first piece, a
    reference to encode, every item of a stream whose tokens have ended), and so is a full call: ``full``
    pieces of one length."""
    if not gather:
        return 0.0
    ended = {id(item.stream) for item in pending if isinstance(item, End)}
    now = time.monotonic()
    wait = math.inf
    lengths: Counter[int] = Counter()
    for item in pending:
        if not isinstance(item, Decode) or item.piece.first or id(item.stream) in ended:
            return 0.0
        lengths[item.frames] += 1
        wait = min(wait, item.cut_at + gather - now, item.stream.runs_out - ENDS_FIRST - now)
    if full is not None and lengths and max(lengths.values()) >= full:
        return 0.0
    return max(0.0, wait) if pending else math.inf


def next_codec_work(
    pending: list[CodecWork],
    max_frames: int | None = None,
    ends_first: float | None = ENDS_FIRST,
    gather: float = 0.0,
    max_batch: int | None = None,
) -> list[CodecWork]:
    """What to do next (nothing, while every item may still wait ``gather``: ``codec_due_in``): the first
    piece of a stream that has sent nothing (a listener is waiting for sound; on a CPU the decoding loop
    too), else a reference to encode (a request waits for it before it can be queued), else the next item
    of a stream whose tokens have ended, while every other listener has at least ``ends_first`` seconds of
    audio in hand (None: never), else the next item of the stream whose listener runs out of audio first
    (the oldest item first would serve the streams that started earlier, with seconds in hand, while one
    that joined later falls silent); a piece goes together with the other streams' next pieces of the
    same length and the ends whose last pieces have it (and each stream's items after those, in order,
    while they have that length too), as many as make ``max_frames`` frames and ``max_batch`` pieces at
    most (all of them when None)."""
    if codec_due_in(pending, gather, max_batch) > 0:
        return []
    lines: dict[int, list[CodecWork]] = {}  # each stream's items in order (they are joined in order)
    for item in pending:  # a reference to encode is a line of its own
        lines.setdefault(id(item if isinstance(item, Encode) else item.stream), []).append(item)
    heads = {key: line[0] for key, line in lines.items()}
    firsts = [item for item in heads.values() if is_first(item)]
    encodes = [item for item in pending if isinstance(item, Encode)]
    ended = {id(item.stream) for item in pending if isinstance(item, End)}
    ending = [item for key, item in heads.items() if key in ended]
    now = time.monotonic()
    if firsts or encodes:
        chosen = firsts[0] if firsts else encodes[0]
    elif (
        ending
        and ends_first is not None
        and all(item.stream.runs_out - now >= ends_first for key, item in heads.items() if key not in ended)
    ):
        chosen = min(ending, key=lambda item: item.stream.runs_out)
    else:  # (min keeps the oldest of equals)
        chosen = min(heads.values(), key=lambda item: item.stream.runs_out)
    if isinstance(chosen, Encode):
        return [chosen]
    # Streams' pieces of one length go together, and so do ends whose last pieces have that length: streams
    # that started together end together, and their ends one call each kept the last client waiting.
    length = chosen.frames
    same = [i for i in heads.values() if not isinstance(i, Encode) and i.frames == length]
    same.sort(key=lambda item: item.stream.runs_out)
    work = [chosen, *(i for i in same if i is not chosen)]
    # Then each stream's next items of that length, its end too (after every stream's first: a batch cut
    # short keeps each stream's most needed item; a stream's own are still joined in order).
    work += [item for head in work for item in _run_after(lines[id(head.stream)], length)]
    # A row decoded in a batch differs from the piece decoded alone by float32 rounding (up to 1.6e-7: the
    # convolutions choose their arithmetic by batch size), at most a step of 16-bit PCM in a sample.
    most = len(work) if max_frames is None or length == 0 else max(1, max_frames // length)
    return work[: min(most, max_batch or most)]


def _run_after(line: list[CodecWork], frames: int) -> list[CodecWork]:
    """A stream's items after its first while they decode ``frames`` frames: its pieces, then its end (the
    last item a stream queues)."""
    run: list[CodecWork] = []
    for item in line[1:]:
        if item.frames != frames:
            break
        run.append(item)
    return run


class AudioStream:
    """Turns one request's delay-pattern columns into audio pieces as they arrive.

    The model emits one column per step; codebook ``c`` of column ``j`` belongs to frame ``j - c``, so a
    frame is complete once the column ``num_codebooks - 1`` steps later exists. The first column is the
    stream's begin marker and the last frame is dropped at the end. Every ``chunk_frames`` frames
    (``first_chunk_frames`` for the first piece) the new frames are cut with ``context_frames`` of
    already-sent frames on their left and the last ``context_frames`` held back until their right-hand
    neighbours exist (``cut``, on the scheduler thread); the codec thread decodes the cut and ``join``s it
    to what was sent with a short crossfade over the previous decode of the same samples.
    """

    def __init__(
        self,
        job: Any,
        layout: Layout,
        to_codec: Callable[[CodecWork], None],
        first_cut: Callable[[], None],
    ):
        self.job = job
        """The engine's request (the codec thread answers it)."""
        self.layout = layout
        self.settings = layout.settings
        self.codebooks = layout.codebooks
        self.to_codec = to_codec
        """Queues a piece for the codec (with the rest of the scheduler's turn)."""
        self.first_cut = first_cut
        """Says that the first piece was cut (on a CPU the decoding loop steps aside until it is decoded)."""
        self.samples_per_frame = layout.sample_rate // layout.frame_rate
        held = self.settings.context_frames * self.samples_per_frame
        self.crossfade = min(held, int(layout.sample_rate * self.settings.crossfade_ms / 1000))
        self.columns: list[np.ndarray] = []  # one step's codes each (numpy: see ``HiggsEngine._take``)
        self.sent = 0  # frames cut so far
        self.tail: np.ndarray | None = None  # the previous decode of the samples the next piece starts with
        self.heard_from: float | None = None  # when its first audio went out (monotonic)
        self.samples_out = 0  # samples gone out

    @property
    def runs_out(self) -> float:
        """When its listener, playing from its first audio on, has heard all the audio sent (monotonic;
        minus infinity before any went out): the codec serves the stream that runs out first."""
        if self.heard_from is None:
            return -math.inf
        return self.heard_from + self.samples_out / self.layout.sample_rate

    @property
    def frames(self) -> int:
        """Frames heard once the stream ends: the columns less the begin marker, the delay and the last."""
        return max(0, len(self.columns) - self.codebooks - 1)

    def add(self, column: np.ndarray) -> None:
        """Take the next column; queue a later piece for the codec when one is due (the engine cuts first
        pieces after the step: ``HiggsEngine._cut_first_pieces``)."""
        self.columns.append(column)
        if self.sent == 0:
            return
        ready = len(self.columns) - self.codebooks  # complete frames after the begin marker
        hold = self.settings.context_frames
        if ready - hold - self.sent >= self.settings.chunk_frames:
            self.to_codec(Decode(self, self.cut(ready - hold, ready)))

    @property
    def first_due_in(self) -> int:
        """Steps until the first piece is complete: 0 at the step it becomes due, -1 a step later."""
        frames = self.settings.first_piece_frames
        return frames + self.codebooks - len(self.columns)

    def cut_first(self) -> None:
        """Queue the first piece (it is due), as long as it would have been cut the step it became due."""
        frames = self.settings.first_chunk_frames
        self.to_codec(Decode(self, self.cut(frames, frames + self.settings.context_frames)))
        self.first_cut()

    @property
    def final_frames(self) -> int:
        """Frames the last piece decodes, its context included (``final``), 0 when none is left."""
        final = self.frames
        return final - self._final_from(final) if final > self.sent else 0

    def final(self) -> Piece | None:
        """The last piece (everything not yet cut), or None."""
        final = self.frames
        return self.cut(final, final, self._final_from(final)) if final > self.sent else None

    def _final_from(self, final: int) -> int:
        """The first frame the last piece decodes: its context's, or earlier, to make it ``end_frames``
        long where the stream has that many frames."""
        first = max(0, self.sent - self.settings.context_frames)
        wanted = self.layout.end_frames
        return final - wanted if wanted and final - first <= wanted <= final else first

    def cut(self, upto: int, available: int, first: int | None = None) -> Piece:
        """Frames [sent, upto) to send, decoded from [first, available): by default from ``sent`` less the
        context."""
        if first is None:
            first = max(0, self.sent - self.settings.context_frames)
        spf = self.samples_per_frame
        piece = Piece(
            self._frames(first, available), (self.sent - first) * spf, (upto - first) * spf, self.sent == 0
        )
        self.sent = upto
        return piece

    def span(self, piece: Piece) -> tuple[int, int]:
        """The samples of the piece's decode that ``join`` reads: those it sends and the tail the next
        piece fades from (where the piece has it)."""
        return piece.start, min(piece.stop + self.crossfade, piece.codes.shape[1] * self.samples_per_frame)

    def join(self, piece: Piece, decoded: np.ndarray, offset: int = 0) -> AudioPiece:
        """The piece's samples, cross-faded into the previous piece's tail; ``decoded[0]`` is sample
        ``offset`` of the piece's decode (at least its ``span``)."""
        start, stop = piece.start - offset, piece.stop - offset
        samples = np.array(decoded[start:stop], dtype=np.float32)
        if self.tail is not None:
            n = min(len(self.tail), len(samples))
            fade = np.linspace(0.0, 1.0, n, dtype=np.float32)
            samples[:n] = self.tail[:n] * (1.0 - fade) + samples[:n] * fade
        self.tail = np.array(decoded[stop : stop + self.crossfade], dtype=np.float32)
        if self.heard_from is None:
            self.heard_from = time.monotonic()
        self.samples_out += len(samples)
        spf = self.samples_per_frame
        codes = AudioCodes(piece.codes[:, piece.start // spf : piece.stop // spf])
        return AudioPiece(np.clip(samples, -1.0, 1.0), codes)

    def codes(self) -> AudioCodes:
        """The frames heard, (codebooks, frames)."""
        frames = self.frames
        if frames == 0:
            return AudioCodes(torch.zeros((self.codebooks, 0), dtype=torch.long))
        return AudioCodes(self._frames(0, frames))

    def _frames(self, first: int, upto: int) -> torch.Tensor:
        """Frames [first, upto) as codes (codebooks, frames), clipped to the codec's range: codebook ``c`` of
        frame ``j`` is in column ``1 + j + c`` (the delay pattern, after the begin marker). Made in numpy:
        on the decoding loop's thread each torch operator would hand the interpreter lock to another
        thread (``HiggsEngine._take``)."""
        n = upto - first
        window = np.stack(self.columns[1 + first : upto + self.codebooks], axis=1)  # (codebooks, n + delay)
        frames = np.stack([window[c, c : c + n] for c in range(self.codebooks)])
        return torch.from_numpy(frames.clip(0, self.layout.codebook_size - 1))
