"""``/v1/audio/transcriptions`` and ``/v1/audio/translations``: speech to text (multipart form)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from audio import AudioError, decode_audio
from errors import APIError, bad_request
from protocol import TranscriptionForm, TranslationForm
from routes.deps import (
    ClientDisconnected,
    RecognizerDep,
    SettingsDep,
    check_model,
    read_upload,
    require_ready,
    until_disconnected,
)
from settings import Settings
from stt import WHISPER_SAMPLE_RATE, AsyncTranscriber, to_srt, to_verbose_json, to_vtt

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/audio", tags=["speech to text"], dependencies=[Depends(require_ready)])

TRANSCRIPT_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")
GRANULARITIES_FIELD = "timestamp_granularities[]"
# The form fields each endpoint reads (others are logged as ignored; the granularities without their
# brackets are read by hand), and those refused when given, since what they ask for cannot be given.
TRANSLATION_FIELDS = {"file", *TranslationForm.model_fields}
TRANSCRIPTION_FIELDS = {
    "file", "timestamp_granularities", *(f.alias or n for n, f in TranscriptionForm.model_fields.items())
}  # fmt: skip
NO_LOGPROBS = "log probabilities are not available from this server's speech recognition"
REFUSED_FIELDS = {"include[]": NO_LOGPROBS, "include": NO_LOGPROBS}


@router.post("/transcriptions")
async def transcriptions(
    form: Annotated[TranscriptionForm, Form()],
    file: Annotated[UploadFile, File()],
    request: Request,
    settings: SettingsDep,
    recognizer: RecognizerDep,
) -> Response:
    """OpenAI's transcription endpoint."""
    if form.stream:
        raise bad_request("streamed transcription is not supported yet; send stream=false", "stream")
    fields = await request.form()  # (parsed once: FastAPI read it for ``form``)
    _check_fields(fields.keys(), TRANSCRIPTION_FIELDS)
    # OpenAI's clients send ``timestamp_granularities[]``; a form written by hand may leave out the brackets.
    granularities, field = form.timestamp_granularities, GRANULARITIES_FIELD
    if not granularities:
        field = "timestamp_granularities"
        granularities = fields.getlist(field)
    return await _speech_to_text("transcribe", form, form.language, granularities, file, request, settings,
                                 recognizer, granularities_field=field)  # fmt: skip


@router.post("/translations")
async def translations(
    form: Annotated[TranslationForm, Form()],
    file: Annotated[UploadFile, File()],
    request: Request,
    settings: SettingsDep,
    recognizer: RecognizerDep,
) -> Response:
    """OpenAI's translation endpoint: speech in any language the model knows, English text out."""
    _check_fields((await request.form()).keys(), TRANSLATION_FIELDS)
    return await _speech_to_text("translate", form, None, [], file, request, settings, recognizer)


def _check_fields(names, known: set[str]) -> None:
    """Refuse a field asking for what cannot be given (400 naming it); log the others not ``known``,
    ignored."""
    given = set(names)
    if refused := sorted(given & REFUSED_FIELDS.keys()):
        name = refused[0]
        raise bad_request(f"{name} is not supported: {REFUSED_FIELDS[name]}; leave it out", name)
    if unknown := given - known:
        log.info("ignored unknown request fields: %s", ", ".join(sorted(unknown)))


async def _speech_to_text(
    task: str,
    form: TranslationForm,
    language: str | None,
    granularities: list[str],
    file: UploadFile,
    request: Request,
    settings: Settings,
    recognizer: AsyncTranscriber | None,
    granularities_field: str = GRANULARITIES_FIELD,
) -> Response:
    """The body both endpoints share: cheap checks, decode, recognise, format. Errors about
    ``granularities`` name ``granularities_field``, the form field they came in."""
    check_model(settings, form.model)
    if recognizer is None:
        raise APIError(
            400, "speech recognition is turned off on this server (HIGGS_STT_MODEL is empty)", param="model"
        )
    fmt = form.response_format
    if fmt not in TRANSCRIPT_FORMATS:
        raise bad_request(
            f"unknown response_format {fmt!r}; use one of: {', '.join(TRANSCRIPT_FORMATS)}", "response_format"
        )
    unknown = set(granularities) - set(GRANULARITIES)
    if unknown:
        raise bad_request(
            f"unknown timestamp granularity {sorted(unknown)[0]!r}; use segment or word",
            granularities_field,
        )
    if granularities and fmt != "verbose_json":
        raise bad_request("timestamp_granularities needs response_format verbose_json", granularities_field)
    if task == "translate" and not recognizer.supports_translation:
        raise bad_request(
            "the speech recognition model cannot translate (English-only and turbo models cannot); "
            "the server's operator can set HIGGS_STT_TRANSLATION_MODEL to a multilingual Whisper model "
            "such as large-v3, medium or small (loaded on the first translation), or use "
            "/v1/audio/transcriptions",
            "model",
        )
    data = await read_upload(file, "file", settings)
    try:
        audio = await asyncio.to_thread(
            decode_audio,
            data,
            target_rate=WHISPER_SAMPLE_RATE,
            max_seconds=settings.max_transcription_seconds,
            format_hint=Path(file.filename or "").suffix.lstrip(".") or None,
        )
    except AudioError as exc:
        raise bad_request(str(exc), "file", code="invalid_audio") from None
    words = "word" in granularities
    try:
        work = recognizer.transcribe(
            audio,
            language=language,
            prompt=form.prompt,
            temperature=form.temperature,
            task=task,
            word_timestamps=words,
        )
        transcript = await until_disconnected(request, work)
    except ClientDisconnected:  # its job is dropped if it still waited for the worker
        return Response(status_code=499)  # nobody reads it; logged and counted as 499
    except ValueError as exc:
        param = "temperature" if "temperature" in str(exc) else "language"
        raise bad_request(str(exc), param) from None
    if fmt == "json":
        return JSONResponse({"text": transcript.text})
    if fmt == "verbose_json":
        segments = "segment" in granularities or not granularities
        return JSONResponse(to_verbose_json(transcript, task, include_words=words, include_segments=segments))
    if fmt == "srt":
        return PlainTextResponse(to_srt(transcript))
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(transcript), media_type="text/vtt")
    return PlainTextResponse(transcript.text + "\n")
