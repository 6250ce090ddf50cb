"""``POST /v1/audio/speech``: OpenAI's text to speech; the body is the audio, streamed as it is made."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response, StreamingResponse

from audio import MEDIA_TYPES
from errors import bad_request
from generation import LONGER_CONTEXT, ContextLengthError
from longform import speak
from protocol import SpeechRequest
from routes.deps import EngineDep, PlannerDep, SettingsDep, check_model, log_ignored, require_generation_slot
from streaming import SSE_HEADERS, speech_audio, speech_events, started

router = APIRouter(tags=["speech"])


@router.post("/v1/audio/speech", dependencies=[Depends(require_generation_slot)])
async def speech(
    body: SpeechRequest, settings: SettingsDep, planner: PlannerDep, engine: EngineDep
) -> Response:
    """The audio of ``input`` in ``response_format``, or OpenAI's speech SSE events."""
    log_ignored(body)
    check_model(settings, body.model)
    if body.sample_rate not in (None, engine.sample_rate):
        raise bad_request(
            f"the audio is made at {engine.sample_rate} Hz; leave sample_rate out or send "
            f"{engine.sample_rate} (and resample on the client)",
            "sample_rate",
        )
    plan = await planner.plan_speech(body)
    events = speak(engine, plan.script, settings.join_fade_ms)  # long texts: in pieces, one stream
    try:
        await started(events)
    except ContextLengthError as exc:  # speech has no max_tokens: what makes the prompt long is the scene
        if exc.audio_bound:  # the voice's reference clip, which no shorter text makes room for
            raise exc.naming(
                "voice", f"use a voice with a shorter reference clip, or {LONGER_CONTEXT}"
            ) from None
        param = "instructions" if (body.instructions or "").strip() else "input"
        raise exc.naming(param, f"shorten the {param}") from None
    headers = {"X-Voice": plan.voice}
    rate = engine.sample_rate
    if body.stream_format == "sse":
        stream = speech_events(events, body.response_format, body.speed, rate)
        return StreamingResponse(stream, media_type="text/event-stream", headers={**headers, **SSE_HEADERS})
    stream = speech_audio(events, body.response_format, body.speed, rate)
    return StreamingResponse(stream, media_type=MEDIA_TYPES[body.response_format], headers=headers)
