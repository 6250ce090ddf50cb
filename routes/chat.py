"""``POST /v1/chat/completions``: speech (or the model's text) as a chat completion, whole or streamed."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from answers import AUDIO_LIFETIME_SECONDS
from errors import bad_request
from generation import (
    LONGER_CONTEXT,
    AudioCodes,
    AudioPiece,
    ContextLengthError,
    Engine,
    GenerationResult,
    Started,
    StreamEvent,
    TextPiece,
    TranscriptPiece,
)
from longform import encode_whole, speak
from planner import TEXT_MAX_TOKENS, Planner
from protocol import AssistantMessage, AudioOut, ChatCompletion, ChatCompletionRequest, Choice, Usage
from routes.deps import (
    EngineDep,
    PlannerDep,
    SettingsDep,
    check_model,
    log_ignored,
    require_generation_slot,
    until_disconnected,
)
from settings import Settings
from streaming import SSE_HEADERS, chat_events, started, usage_of

log = logging.getLogger(__name__)
router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_none=False,
    dependencies=[Depends(require_generation_slot)],
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    settings: SettingsDep,
    planner: PlannerDep,
    engine: EngineDep,
) -> Response:
    """OpenAI's chat completions with audio output: the last user message spoken, or the model's text."""
    try:
        return await _complete(body, request, settings, planner, engine)
    except ContextLengthError as exc:
        raise _blamed(body, exc) from None


def _blamed(body: ChatCompletionRequest, exc: ContextLengthError) -> ContextLengthError:
    """A context overflow blamed on the field the client sent: ``max_completion_tokens`` (which wins over
    ``max_tokens``), else ``max_tokens``, else the messages (the answer's length was the server's default);
    the messages too when they alone fill the context (no ``max_tokens`` would fit)."""
    if exc.param != "max_tokens":
        return exc
    if exc.prompt_alone and exc.audio_bound:  # a voice's reference clip, or the messages' audio
        return exc.naming(
            "messages", f"shorten the messages' audio or the voice's reference clip, or {LONGER_CONTEXT}"
        )
    if exc.prompt_alone:
        return exc.naming("messages", "shorten the messages")
    if body.max_completion_tokens is not None:
        return exc.naming("max_completion_tokens", "shorten the messages or lower max_completion_tokens")
    if body.max_tokens is None:
        return exc.naming(
            "messages",
            f"shorten the messages (a text answer without max_tokens may take up to {TEXT_MAX_TOKENS} "
            "tokens, a spoken one what its text needs)",
        )
    return exc.naming("max_tokens", "shorten the messages or lower max_tokens")


async def _complete(
    body: ChatCompletionRequest, request: Request, settings: Settings, planner: Planner, engine: Engine
) -> Response:
    log_ignored(body)
    if body.wants_audio and body.stop_strings:  # the spoken text is the client's own: nothing to stop
        log.info("stop applies to text answers; ignored for this audio answer")
    check_model(settings, body.model)
    # A stream's audio is pcm16: a format left out means it, as when the audio object is left out.
    if body.stream and body.wants_audio and body.audio and body.audio.format_given not in (None, "pcm16"):
        raise bad_request("streamed audio is pcm16; set audio.format to pcm16", "audio.format")
    # A reference to recognise and encode is work the client may not wait for (gone: a 499, ``errors.py``).
    plan = await until_disconnected(request, planner.plan(body))
    headers = {}
    if body.wants_audio:  # the voice of an audio answer (a text answer has none)
        headers["X-Voice"] = plan.voice
        if plan.fallback:
            headers["X-Voice-Fallback"] = f"default; reason={plan.fallback}"
    completion_id = "chatcmpl-" + uuid.uuid4().hex
    created = int(time.time())
    audio_id = "audio_" + uuid.uuid4().hex
    if body.stream:
        if plan.script is not None:  # an audio answer: spoken in pieces when the text is long
            events = speak(engine, plan.script, settings.join_fade_ms)
        elif plan.request is not None:
            events = engine.stream(plan.request)
        else:
            events = _answer_events(plan.direct_answer)
        await started(events)
        if body.wants_audio:
            events = _remembered(events, planner, audio_id)
        body_stream = chat_events(
            events,
            completion_id=completion_id,
            created=created,
            model=body.model,
            audio_id=audio_id if body.wants_audio else None,
            expires_at=created + AUDIO_LIFETIME_SECONDS,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            sample_rate=engine.sample_rate,
        )
        return StreamingResponse(
            body_stream, media_type="text/event-stream", headers={**headers, **SSE_HEADERS}
        )
    if plan.script is not None:  # (a client gone meanwhile: a 499, ``errors.py``)
        # Encoded as it is decoded, piece by piece: memory stays bounded whatever the length.
        fmt = body.audio.format if body.audio else "wav"
        events = speak(engine, plan.script, settings.join_fade_ms)
        data, result = await until_disconnected(request, encode_whole(events, fmt, engine.sample_rate))
    elif plan.request is not None:
        result = await until_disconnected(request, engine.generate(plan.request))
    else:
        result = plan.direct_answer
    if plan.script is not None:
        # The transcript of the pieces spoken: the whole text unless max_tokens ran out first.
        await planner.remember_answer(audio_id, result.text, result.codes)
        audio_out = AudioOut(
            id=audio_id,
            data=base64.b64encode(data).decode("ascii"),
            expires_at=created + AUDIO_LIFETIME_SECONDS,
            transcript=result.text,
        )
        message = AssistantMessage(content=None, audio=audio_out)
    else:
        message = AssistantMessage(content=result.text)
    choice = Choice(message=message, finish_reason=result.finish_reason)
    completion = ChatCompletion(
        id=completion_id, created=created, model=body.model, choices=[choice], usage=Usage(**usage_of(result))
    )
    return JSONResponse(completion.model_dump(mode="json"), headers=headers)


async def _remembered(
    events: AsyncIterator[StreamEvent], planner: Planner, audio_id: str
) -> AsyncIterator[StreamEvent]:
    """``events``, keeping the answer (its transcript and last piece's audio) for later requests that refer
    to ``audio_id``: once finished, or as far as it was sent when the stream is cut short (a listener who
    interrupts the answer, a voice agent's barge-in, still holds an id that works)."""
    said: list[str] = []  # the transcript of the pieces begun
    codes: list[AudioCodes] = []  # the frames sent of the last piece
    finished = False
    try:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, TranscriptPiece):
                    said.append(event.text)
                    codes = []
                elif isinstance(event, AudioPiece) and event.codes is not None:
                    codes.append(event.codes)
                elif isinstance(event, GenerationResult):
                    await planner.remember_answer(audio_id, event.text, event.codes)
                    finished = True
                yield event
    finally:
        if not finished:  # (not awaited: the stream may be cancelled; a shared answer's file is on its way)
            planner.answers.put(audio_id, "".join(said), AudioCodes.joined(codes))


async def _answer_events(answer: GenerationResult) -> AsyncIterator[StreamEvent]:
    """An answer that needs no generation, as a stream."""
    yield Started(prompt_tokens=0, prompt_audio_tokens=0)
    if answer.text:
        yield TextPiece(answer.text)
    yield answer
