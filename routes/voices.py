"""``/v1/audio/voices``: store, list, read and delete voices (multipart upload, as OpenAI's custom voices)."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from audio import MEDIA_TYPES, encode_audio
from errors import APIError
from protocol import InvalidRequest
from routes.deps import (
    SettingsDep,
    VoicesDep,
    each_field_once,
    read_upload,
    require_generation_slot,
    require_ready,
)

log = logging.getLogger(__name__)

# The library opens once the models are loaded (a voice is encoded by the codec): 503 until then.
router = APIRouter(prefix="/v1/audio/voices", tags=["voices"], dependencies=[Depends(require_ready)])


@router.post("", dependencies=[Depends(require_generation_slot)])
async def create_voice(
    request: Request,
    voices: VoicesDep,
    settings: SettingsDep,
    name: Annotated[str, Form()],
    audio_sample: Annotated[UploadFile | None, File()] = None,
    transcript: Annotated[str | None, Form()] = None,
    consent: Annotated[str | None, Form()] = None,
    voice_type: Annotated[str | None, Form(alias="type")] = None,
) -> JSONResponse:
    """Store a voice from an audio sample (transcribed when no transcript is given)."""
    if voice_type not in (None, "audio_sample"):
        raise InvalidRequest(
            f"this server makes voices from an audio sample only, not of type {voice_type!r}; send the "
            "clip as audio_sample (type audio_sample, or no type)",
            "type",
        )
    if audio_sample is None:
        raise InvalidRequest("this field is required: the voice's reference clip, as a file", "audio_sample")
    await each_field_once(request, files=("audio_sample",))
    data = await read_upload(audio_sample, "audio_sample", settings)
    if transcript is not None and not transcript.strip():
        transcript = None  # a blank field, as a form sends an empty one: recognised, as when left out
    voice = await voices.create(name, data, transcript)
    log.info("stored voice %r (%.1f s)", voice.name, voice.duration)
    return JSONResponse(voice.public())


@router.get("")
async def list_voices(voices: VoicesDep) -> JSONResponse:
    """Every stored voice in ``data``; in ``voices``, every name a request may use as ``voice`` (the list
    Open WebUI and Kokoro clients read)."""
    stored = await voices.list()
    usable = await asyncio.to_thread(voices.names)
    return JSONResponse(
        {
            "object": "list",
            "data": [v.public() for v in stored],
            "voices": [{"id": name, "name": name} for name in usable],
        }
    )


@router.get("/{voice_id}")
async def get_voice(voice_id: str, voices: VoicesDep) -> JSONResponse:
    """One stored voice, by id or name."""
    return JSONResponse((await voices.get(voice_id)).public())


@router.get("/{voice_id}/sample")
async def voice_sample(voice_id: str, voices: VoicesDep, request: Request) -> Response:
    """A stored voice's reference clip as WAV (24 kHz mono), by id or name: what the voice sounds like."""
    voice = await voices.get(voice_id)
    data = await asyncio.to_thread(lambda: encode_audio(voices.library.audio(voice), "wav"))
    return _ranged(request, data, MEDIA_TYPES["wav"])


def _ranged(request: Request, data: bytes, media_type: str) -> Response:
    """``data`` whole, or the one byte range that a ``Range: bytes=...`` header asks for (206), as a file
    server answers it: Safari's ``<audio>`` asks for a range first and may not play an answer without one.
    A range that starts past the end is a 416; several ranges, or a header that is not a byte range, get
    the whole (HTTP lets a server ignore a range it does not serve), and so does a number of more than 18
    digits (a security review's 5,000 nines were a 500: Python reads no integer that long)."""
    size, whole = len(data), {"Accept-Ranges": "bytes"}
    asked = re.fullmatch(r"bytes=(\d{0,18})-(\d{0,18})", request.headers.get("range", "").strip())
    if (
        asked is None
        or asked[1] == asked[2] == ""
        or (asked[1] and asked[2] and int(asked[2]) < int(asked[1]))
    ):
        return Response(data, media_type=media_type, headers=whole)
    if asked[1]:
        start, end = int(asked[1]), min(int(asked[2] or size - 1), size - 1)
    else:  # the last N bytes
        start, end = max(0, size - int(asked[2])), size - 1
    if start >= size or end < start:
        raise APIError(
            416,
            f"the range {asked[0]!r} is past the end of the {size}-byte clip",
            param="Range",
            code="range_not_satisfiable",
            headers={"Content-Range": f"bytes */{size}"},
        )
    ranged = {**whole, "Content-Range": f"bytes {start}-{end}/{size}"}
    return Response(data[start : end + 1], 206, media_type=media_type, headers=ranged)


@router.delete("/{voice_id}")
async def delete_voice(voice_id: str, voices: VoicesDep) -> JSONResponse:
    """Remove a stored voice, by id or name."""
    voice = await voices.delete(voice_id)
    return JSONResponse({"id": voice.id, "object": "audio.voice.deleted", "deleted": True})
