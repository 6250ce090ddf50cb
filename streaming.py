"""Response bodies made while the engine generates: chat-completion SSE, speech audio and speech SSE.

Each takes the engine's event iterator after ``started`` has read its ``Started`` event (so every 4xx has
already been answered) and yields bytes. Leaving early (the client disconnected) closes the engine's
iterator, which stops the generation within one decoding step. A failure after the headers were sent ends
an SSE stream with an ``error`` event (``errors.error_body``); a plain audio body is cut off (an incomplete
chunked body tells the client it failed).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import numpy as np

from audio import EncoderStream, TempoStream, pcm16
from errors import error_body
from generation import (
    AudioPiece,
    EngineFailure,
    GenerationResult,
    Started,
    StreamEvent,
    TextPiece,
    TranscriptPiece,
)

log = logging.getLogger(__name__)

SERVER_ERROR = error_body("generation failed; see the server log", "server_error")["error"]

_ENDED_BY: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("stream_ended_by", default=None)


def note_errors() -> tuple[list[str], contextvars.Token]:
    """For the request being served: the list its stream's ``error`` events are noted in (each one's code,
    or type), so that the request's log line can tell a stream an error ended from one sent whole; and the
    token that undoes it (``contextvars.ContextVar.reset``)."""
    noted: list[str] = []
    return noted, _ENDED_BY.set(noted)


def error_event(error: dict[str, Any], **fields: Any) -> bytes:
    """The SSE ``error`` event that ends a stream after its headers (``error``: the envelope's object),
    noted for the request's log line (``note_errors``)."""
    noted = _ENDED_BY.get()
    if noted is not None:
        noted.append(error.get("code") or error.get("type") or "error")
    return sse({**fields, "error": error})


def failure_error(exc: Exception) -> dict[str, Any]:
    """The ``error`` object of an SSE stream that ``exc`` ended: an engine failure says what it was (the
    server shutting down, out of memory, ...), logged as one line; anything else is the server's to log,
    with its traceback, and the client hears that generation failed."""
    if isinstance(exc, EngineFailure):
        log.warning("stream ended by the engine: %s (%s)", exc, exc.code)
        return error_body(str(exc), "server_error", code=exc.code)["error"]
    log.exception("generation failed mid-stream")
    return SERVER_ERROR


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""Headers of every server-sent event stream: no cache or proxy may hold its events back (nginx buffers a
response unless told not to, and a stream with no such header went out without them)."""


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def started(events: AsyncIterator[StreamEvent]) -> Started:
    """Wait for generation to start, so that errors found while preparing it are answered as errors; the
    stream is closed when it does not start."""
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    if not isinstance(first, Started):
        await events.aclose()
        raise RuntimeError(f"the engine's stream began with {type(first).__name__}")
    return first


def no_audio(sample_rate: int) -> np.ndarray:
    """An audio answer in which the model made no audio at all (``max_tokens`` shorter than the codebooks'
    delay, or an end at once): 10 ms of silence, streamed or not, so that every format has something to
    hold and a stream carries its audio's id and transcript."""
    return np.zeros(sample_rate // 100, np.float32)


async def chat_events(
    events: AsyncIterator[StreamEvent],
    *,
    completion_id: str,
    created: int,
    model: str,
    audio_id: str | None,
    expires_at: int,
    include_usage: bool,
    sample_rate: int,
) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` events: base64 PCM16 audio in ``delta.audio``, text in ``delta.content``.

    ``delta.audio`` has the shape the ``openai`` SDK's types describe and its stream helper accumulates
    (strings concatenated, numbers added): the ``id`` once, with the first audio; ``data`` in every audio
    delta, each a whole number of 3-byte groups (3 samples), so that the deltas' base64 strings concatenate
    to the base64 of the whole audio (padding mid-string would end a decode there); the audio's transcript
    in ``transcript`` with the first audio of what it says (a long text's pieces each with their own), so
    that the deltas concatenate to the transcript of the audio sent; and ``expires_at`` once, in the last
    audio delta (which always holds ``data``, if empty: clients such as Boson's example read ``data`` from
    every audio delta)."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        # With include_usage every chunk carries usage, null until the last one's (OpenAI's shape).
        usage = {"usage": None} if include_usage else {}
        return sse({**head, "system_fingerprint": None, "choices": [choice], **usage, **extra})

    first_audio = True
    said = ""  # transcript not yet sent
    held = b""  # PCM bytes beyond the last whole group of 6 (3 samples: 6 bytes encode to 8 characters)

    def audio_chunk(samples: np.ndarray | None, last: bool = False) -> bytes | None:
        nonlocal first_audio, said, held
        audio: dict[str, Any] = {"id": audio_id} if first_audio else {}
        data = held + (pcm16(samples) if samples is not None else b"")
        cut = len(data) if last else len(data) - len(data) % 6
        held = data[cut:]
        if cut or last:
            audio["data"] = base64.b64encode(data[:cut]).decode()
        if said:
            audio["transcript"], said = said, ""
        if last:
            audio["expires_at"] = expires_at
        if not audio:
            return None
        first_audio = False
        return chunk({"audio": audio})

    async with aclosing(events):
        yield chunk({"role": "assistant", "content": None if audio_id else ""})
        try:
            async for event in events:
                if isinstance(event, AudioPiece) and audio_id:
                    if (data := audio_chunk(event.samples)) is not None:
                        yield data
                elif isinstance(event, TranscriptPiece) and audio_id:
                    said += event.text
                elif isinstance(event, TextPiece):
                    yield chunk({"content": event.text})
                elif isinstance(event, GenerationResult):
                    if audio_id:
                        samples = no_audio(sample_rate) if first_audio else None
                        yield audio_chunk(samples, last=True)
                    yield chunk({}, event.finish_reason)
                    if include_usage:
                        yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": model, "system_fingerprint": None, "choices": [],
                                   "usage": usage_of(event)})  # fmt: skip
        except Exception as exc:
            yield error_event(failure_error(exc))
            return
        yield sse("[DONE]")


def usage_of(result: GenerationResult) -> dict[str, Any]:
    """OpenAI's chat ``usage`` object for a result: its audio models split each side into ``audio_tokens``
    and ``text_tokens`` (what cost calculators read)."""
    prompt_text = result.prompt_tokens - result.prompt_audio_tokens
    completion_text = result.completion_tokens - result.completion_audio_tokens
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": result.prompt_audio_tokens,
                                  "text_tokens": prompt_text},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": result.completion_audio_tokens,
                                      "text_tokens": completion_text, "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }  # fmt: skip


async def _encoded(
    events: AsyncIterator[StreamEvent], fmt: str, speed: float, sample_rate: int
) -> AsyncIterator[bytes | GenerationResult]:
    """The engine's audio, tempo-changed and encoded as it comes; the result last."""
    encoder = EncoderStream(fmt, sample_rate)
    tempo = TempoStream(speed, sample_rate) if speed != 1.0 else None

    def encode(samples: np.ndarray, last: bool) -> bytes:
        if tempo is not None:
            samples = np.concatenate([tempo.feed(samples), tempo.finish()]) if last else tempo.feed(samples)
        data = encoder.feed(samples)
        return data + encoder.finish() if last else data

    async with aclosing(events):
        async for event in events:
            if isinstance(event, AudioPiece):
                data = await asyncio.to_thread(encode, event.samples, False)
            elif isinstance(event, GenerationResult):
                yield await asyncio.to_thread(encode, np.zeros(0, np.float32), True)
                yield event
                return
            else:
                continue
            if data:
                yield data


async def speech_audio(
    events: AsyncIterator[StreamEvent], fmt: str, speed: float, sample_rate: int
) -> AsyncIterator[bytes]:
    """The speech body itself, streamed. A failure midway cuts the body off (re-raised)."""
    async with aclosing(_encoded(events, fmt, speed, sample_rate)) as pieces:
        async for piece in pieces:
            if isinstance(piece, bytes) and piece:
                yield piece


async def speech_events(
    events: AsyncIterator[StreamEvent], fmt: str, speed: float, sample_rate: int
) -> AsyncIterator[bytes]:
    """OpenAI's ``speech.audio.delta`` events (base64 of the encoded audio), then ``speech.audio.done``."""
    try:
        async with aclosing(_encoded(events, fmt, speed, sample_rate)) as pieces:
            async for piece in pieces:
                if isinstance(piece, bytes):
                    if piece:
                        yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()})
                else:
                    usage = {"input_tokens": piece.prompt_tokens, "output_tokens": piece.completion_tokens,
                             "total_tokens": piece.prompt_tokens + piece.completion_tokens}  # fmt: skip
                    # finish_reason is this server's extension: "length" when a limit cut the speech short.
                    done = {"type": "speech.audio.done", "usage": usage, "finish_reason": piece.finish_reason}
                    yield sse(done)
    except Exception as exc:
        yield error_event(failure_error(exc), type="error")
