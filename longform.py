"""Long texts, spoken whole: piece by piece, each piece after the last pieces' own audio, as one stream.

A text is split into pieces (``text_split``). Piece k is one generation through ``engine.stream``, so the
batched engine serves other requests beside the pieces of a long one; while the listener has little audio
in hand (``KEEP_SLOT_LEAD``) each piece keeps its slot for the next (``keep_slot``, ``continues``), so when
every slot is taken the next piece does not wait behind the line and the listener hears no gap. Its prompt
is the request's voice (the scene and, for a cloned or stored voice, the reference clip) followed by the last
``context_pieces`` pieces as the model itself made them (a user turn with a piece's text, an assistant turn
with the audio codes generated for it) and then the user turn of piece k: the rolling buffer of Higgs Audio's
own long-form generation script, so that voice and prosody carry on from piece to piece.

Audio goes out as it is decoded: the first piece plays while the rest are generated, so a long text starts
sounding as soon as a short one. At each join the end of one piece fades out and the start of the next fades
in over a few milliseconds, so no join clicks whatever the two sides' levels. Usage is summed over the
pieces; ``finish_reason`` is ``length`` when any piece hit its cap or the client's ``max_tokens`` ended the
text early.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace

import numpy as np

from audio import EncoderStream
from generation import (
    AudioCodes,
    AudioPiece,
    ContextLengthError,
    Engine,
    EngineBusy,
    GenerationRequest,
    GenerationResult,
    Started,
    StreamEvent,
    TranscriptPiece,
    Turn,
)
from streaming import no_audio, started
from text_split import spaced

log = logging.getLogger(__name__)

BUSY_RETRY_SECONDS = 0.05
KEEP_SLOT_LEAD = 4.0
"""A piece keeps its slot for the next one while the listener has less audio than this in hand (seconds
sent and not yet heard, if it plays from the first piece on). With more, the next piece waits its turn at
the head of the line without a gap being heard, and new requests are not held behind long texts."""


@dataclass(frozen=True)
class Script:
    """A text to speak in pieces: the prompt before it, the pieces, and how each is generated."""

    prefix: list[Turn]
    """The prompt before the text: the system turn with the scene, and the voice reference's turns if any."""
    pieces: list[str]
    template: GenerationRequest
    """Sampling settings for every piece; its ``turns`` and ``max_new_tokens`` are replaced per piece."""
    caps: list[int]
    """Each piece's own cap on output tokens (used when the client gave no ``max_tokens``)."""
    transcripts: list[str]
    """What each piece adds to the answer's transcript: the piece and the whitespace before it, so that the
    pieces spoken concatenate to the text spoken."""
    budget: int | None = None
    """The client's ``max_tokens`` for the whole answer: each piece may use what the earlier ones left."""
    context_pieces: int = 2
    """How many previous pieces (text and generated codes) precede each piece in its prompt."""

    def request(
        self, k: int, history: list[tuple[str, AudioCodes]], max_new_tokens: int, keep_slot: bool = True
    ) -> GenerationRequest:
        """The generation of piece ``k`` after the pieces in ``history`` (oldest first). A piece with another
        after it keeps its slot for that one (unless ``keep_slot`` is false), and a later piece continues the
        answer (``GenerationRequest``): under load the listener hears no gap while new requests take the slot
        between two pieces."""
        context = [t for text, codes in history for t in (Turn("user", text), Turn("assistant", audio=codes))]
        # Piece k's seed: the request's plus k, wrapped into the signed 64-bit range.
        seed = None if self.template.seed is None else (self.template.seed + k + 2**63) % 2**64 - 2**63
        return replace(
            self.template,
            turns=[*self.prefix, *context, Turn("user", self.pieces[k])],
            max_new_tokens=max_new_tokens,
            seed=seed,
            keep_slot=keep_slot and k < len(self.pieces) - 1,
            continues=k > 0,
        )


def script_for(
    request: GenerationRequest,
    pieces: list[str],
    caps: list[int],
    budget: int | None,
    context_pieces: int,
) -> Script:
    """The script that speaks ``pieces`` where ``request`` (whose last turn is the user's text) would speak
    them all at once."""
    transcripts = spaced(request.turns[-1].text, pieces)
    return Script(request.turns[:-1], pieces, request, caps, transcripts, budget, context_pieces)


class Joiner:
    """Fades the last ``n`` samples of a piece out and the first ``n`` of the next one in (raised cosine).

    The last ``n`` samples of a piece that another follows are held back until the piece ends, since only
    then is it known that they are its last. Both ramps keep the length: the pieces' samples add up to the
    answer's.
    """

    def __init__(self, n: int):
        self.n = n
        i = np.arange(n, dtype=np.float32)
        self.ramp_in = (0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / max(n, 1))).astype(np.float32)
        self.held = np.zeros(0, np.float32)
        self.faded_in = n  # samples of the current piece's fade-in already applied
        self.hold = n  # samples held back from the current piece (0 for the last piece)

    def start(self, fade_in: bool, fade_out: bool) -> None:
        """A new piece begins: ``fade_in`` for all pieces but the first, ``fade_out`` for all but the last."""
        self.faded_in = 0 if fade_in else self.n
        self.hold = self.n if fade_out else 0

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """The next samples of the current piece; returns those that can be sent now."""
        x = np.array(samples, dtype=np.float32)
        if self.faded_in < self.n:
            m = min(self.n - self.faded_in, len(x))
            x[:m] *= self.ramp_in[self.faded_in : self.faded_in + m]
            self.faded_in += m
        if self.hold == 0:
            return x
        buffer = np.concatenate([self.held, x])
        self.held = buffer[-self.hold :]
        return buffer[: -self.hold]

    def end(self, fade_out: bool) -> np.ndarray:
        """The current piece ended: its held-back samples, faded out when another piece follows."""
        tail, self.held = self.held, np.zeros(0, np.float32)
        if fade_out and len(tail):
            tail = tail * self.ramp_in[::-1][-len(tail) :]
        return tail


async def _open(
    engine: Engine,
    script: Script,
    k: int,
    history: deque[tuple[str, AudioCodes]],
    max_new_tokens: int,
    keep_slot: bool,
) -> tuple[AsyncIterator[StreamEvent], Started, GenerationRequest]:
    """Start piece ``k``: its stream, its ``Started`` event and its request.

    For a later piece (the answer is already under way, a 4xx is no longer possible) a prompt too long for
    the context drops the oldest context pieces rather than failing, and a full queue is waited out (the
    service's engine never refuses a continuation; an engine that does not know them may).
    """
    deadline = time.monotonic() + (script.template.time_limit or 300.0)
    while True:
        request = script.request(k, list(history), max_new_tokens, keep_slot)
        events = engine.stream(request)
        try:
            return events, await started(events), request  # (it closes the stream when it raises)
        except ContextLengthError:
            if k == 0 or not history:
                raise
            history.popleft()
            log.info("piece %d: context shortened to %d pieces to fit", k + 1, len(history))
        except EngineBusy:
            if k == 0 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(BUSY_RETRY_SECONDS)


async def _check_later_pieces(engine: Engine, script: Script) -> None:
    """Before the answer starts (while a 4xx is still possible): every later piece fits the context with no
    earlier piece in its prompt, and the most output it may be given (``_open`` drops context pieces to
    fit, which is all it can do once the answer is under way)."""
    for k in range(1, len(script.pieces)):
        cap = script.caps[k] if script.budget is None else script.budget
        await engine.check_context(script.request(k, [], cap, keep_slot=False))


async def speak(engine: Engine, script: Script, join_ms: float = 10.0) -> AsyncIterator[StreamEvent]:
    """Speak ``script``: ``Started`` (of the first piece), then for each piece its ``TranscriptPiece`` and its
    audio as it is decoded, and finally a ``GenerationResult`` summing the pieces' usage, whose ``text`` is
    the transcript of the pieces spoken (all of them, unless ``max_tokens`` ran out first). Closing it early
    stops the piece being generated."""
    joiner = Joiner(int(engine.sample_rate * join_ms / 1000))
    in_hand = _InHand(engine.sample_rate)
    history: deque[tuple[str, AudioCodes]] = deque(maxlen=script.context_pieces)
    results: list[GenerationResult] = []
    said: list[str] = []
    used, cut = 0, False
    kept: GenerationRequest | None = None  # the last piece's, while its slot is kept for the next one
    try:
        for k, text in enumerate(script.pieces):
            cap = script.caps[k] if script.budget is None else script.budget - used
            if cap <= 0:
                cut = True  # (the client's own limit: not worth a warning)
                log.info("max_tokens ran out after %d of %d pieces of the text", k, len(script.pieces))
                break
            keep_slot = in_hand.seconds() < KEEP_SLOT_LEAD
            if k == 0:  # before the first piece is queued: a 400 then costs no place in the line, no decoding
                await _check_later_pieces(engine, script)
            events, started, request = await _open(engine, script, k, history, cap, keep_slot)
            kept = None  # the next piece is in the line, at its head: the slot is its own
            if k == 0:
                yield started
            said.append(script.transcripts[k])
            yield TranscriptPiece(said[-1])
            joiner.start(fade_in=k > 0, fade_out=k < len(script.pieces) - 1)
            result = None
            codes: list[AudioCodes] = []  # the frames of the samples the joiner holds, passed on with them
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, AudioPiece):
                        out = joiner.feed(event.samples)
                        codes += [event.codes] if event.codes is not None else []
                        if out.size:
                            in_hand.sent(out.size)
                            yield AudioPiece(out, AudioCodes.joined(codes))
                            codes = []
                    elif isinstance(event, GenerationResult):
                        result = event
            if result is None:
                raise RuntimeError("the engine's stream ended without a result")
            kept = request if request.keep_slot else None
            tail = joiner.end(fade_out=k < len(script.pieces) - 1)
            if tail.size:
                in_hand.sent(tail.size)
                yield AudioPiece(tail, AudioCodes.joined(codes))
            results.append(result)
            used += result.completion_tokens
            if result.codes is not None:
                history.append((text, result.codes))
            if result.finish_reason == "length":
                cut = True
                if script.budget is not None and result.completion_tokens >= cap:  # the client's limit
                    log.info("max_tokens ran out in piece %d of %d of the text", k + 1, len(script.pieces))
                else:
                    log.warning("piece %d of %d reached its cap before it ended", k + 1, len(script.pieces))
    finally:
        if kept is not None:  # no next piece comes (the client left, max_tokens ran out): its slot goes back
            engine.release_slot(kept)
    yield _total(results, cut, "".join(said))


class _InHand:
    """Seconds of audio a listener has been sent and not yet heard, if it plays from its first audio on."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.first: float | None = None
        self.samples = 0

    def sent(self, samples: int) -> None:
        if self.first is None:
            self.first = time.monotonic()
        self.samples += samples

    def seconds(self) -> float:
        if self.first is None:
            return 0.0
        return self.samples / self.sample_rate - (time.monotonic() - self.first)


def _total(results: list[GenerationResult], cut: bool, transcript: str) -> GenerationResult:
    """One result for the whole text: its ``transcript`` as the text, usage and durations summed, the last
    piece's codes."""
    return GenerationResult(
        text=transcript,
        audio=None,
        finish_reason="length" if cut else "stop",
        prompt_tokens=sum(r.prompt_tokens for r in results),
        prompt_audio_tokens=sum(r.prompt_audio_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        completion_audio_tokens=sum(r.completion_audio_tokens for r in results),
        seconds=sum(r.seconds for r in results),
        audio_seconds=sum(r.audio_seconds for r in results),
        # The last piece's audio: what a later request that refers to this answer continues from.
        codes=results[-1].codes if results else None,
    )


def _wav_header(sample_rate: int, data_bytes: int) -> bytes:
    """A 16-bit mono WAV header for ``data_bytes`` of samples."""
    return (
        b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data" + struct.pack("<I", data_bytes)
    )  # fmt: skip


async def encode_whole(
    events: AsyncIterator[StreamEvent], fmt: str, sample_rate: int
) -> tuple[bytes, GenerationResult]:
    """A non-streamed answer: the stream's audio encoded as ``fmt`` as it comes, and the final result.

    Only the encoded answer grows with its length (flac, whose header needs the length, holds its samples
    until the end); no decode or encode step ever sees more than one piece of the stream (``no_audio`` when
    there is none).
    """
    wav = fmt == "wav"
    encoder = EncoderStream("pcm" if wav or fmt == "pcm16" else fmt, sample_rate)
    chunks: list[bytes] = []
    heard = False
    result = None
    async with aclosing(events):
        async for event in events:
            if isinstance(event, AudioPiece) and event.samples.size:
                heard = True
                chunks.append(await asyncio.to_thread(encoder.feed, event.samples))
            elif isinstance(event, GenerationResult):
                result = event
    if result is None:
        raise RuntimeError("the engine's stream ended without a result")
    if not heard:
        chunks.append(encoder.feed(no_audio(sample_rate)))
    chunks.append(await asyncio.to_thread(encoder.finish))
    data = b"".join(chunks)
    return (_wav_header(sample_rate, len(data)) + data if wav else data), result
