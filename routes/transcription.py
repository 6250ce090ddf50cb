"""``/v1/audio/transcriptions`` and ``/v1/audio/translations``: speech to text (multipart form)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from audio import Audio, AudioError, decode_audio, decoding
from errors import APIError, as_api_error, bad_request
from protocol import TranscriptionForm, TranslationForm
from routes.deps import (
    RecognizerDep,
    SettingsDep,
    check_model,
    each_field_once,
    read_upload,
    require_ready,
    until_disconnected,
)
from settings import Settings
from streaming import SSE_HEADERS, error_event, sse
from stt import (
    WHISPER_SAMPLE_RATE,
    AsyncTranscriber,
    Segment,
    TranscriberClosed,
    Transcript,
    to_srt,
    to_verbose_json,
    to_vtt,
    usage,
)

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
# Streamed transcription sends text only (OpenAI's ``transcript.text.delta`` events), so it takes the formats
# whose answer is text alone; OpenAI's own models that stream take no others either.
STREAMED_FORMATS = ("json", "text")
# OpenAI: "streaming is not supported for the whisper-1 model and will be ignored".
UNSTREAMED_MODELS = ("whisper-1",)


@router.post("/transcriptions")
async def transcriptions(
    form: Annotated[TranscriptionForm, Form()],
    file: Annotated[UploadFile, File()],
    request: Request,
    settings: SettingsDep,
    recognizer: RecognizerDep,
) -> Response:
    """OpenAI's transcription endpoint."""
    fields = await request.form()  # (parsed once: FastAPI read it for ``form``)
    await _check_fields(request, TRANSCRIPTION_FIELDS)
    stream = form.stream
    if stream and form.model in UNSTREAMED_MODELS:
        log.info("stream ignored: %s answers unstreamed, as OpenAI's does", form.model)
        stream = False
    # OpenAI's clients send ``timestamp_granularities[]``; a form written by hand may leave out the brackets.
    # Both spellings in one form are both taken (the plain one's values were dropped without a word).
    granularities, field = form.timestamp_granularities, GRANULARITIES_FIELD
    if plain := fields.getlist("timestamp_granularities"):
        field = field if granularities else "timestamp_granularities"
        granularities = [*granularities, *plain]
    return await _speech_to_text("transcribe", form, form.language, granularities, file, request, settings,
                                 recognizer, granularities_field=field, stream=stream)  # fmt: skip


@router.post("/translations")
async def translations(
    form: Annotated[TranslationForm, Form()],
    file: Annotated[UploadFile, File()],
    request: Request,
    settings: SettingsDep,
    recognizer: RecognizerDep,
) -> Response:
    """OpenAI's translation endpoint: speech in any language the model knows, English text out."""
    await _check_fields(request, TRANSLATION_FIELDS)
    return await _speech_to_text("translate", form, None, [], file, request, settings, recognizer)


async def _decoded(data: bytes, filename: str | None, settings: Settings) -> Audio:
    """The upload decoded at Whisper's rate on a decoding thread, which stops at its next block of samples
    when the request is cancelled (its client left: half an hour of audio takes seconds to decode)."""
    stop = threading.Event()
    try:
        return await decoding(
            decode_audio,
            data,
            target_rate=WHISPER_SAMPLE_RATE,
            max_seconds=settings.max_transcription_seconds,
            format_hint=Path(filename or "").suffix.lstrip(".") or None,
            stop=stop,
        )
    except asyncio.CancelledError:
        stop.set()
        raise


async def _check_fields(request: Request, known: set[str]) -> None:
    """Refuse a field given twice (a second file too), and a field asking for what cannot be given (400
    naming it); log the others not ``known``, ignored."""
    await each_field_once(request, files=("file",))
    given = set((await request.form()).keys())
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
    stream: bool = False,
) -> Response:
    """The body both endpoints share: cheap checks, decode, recognise, format (or ``stream`` the text as it
    is recognised). Errors about ``granularities`` name ``granularities_field``, the form field they came
    in."""
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
        # Only verbose_json holds timestamps; clients such as the Vercel AI SDK send the field with json for
        # the gpt-4o models, which OpenAI answers: ignored, as there.
        log.info("%s ignored: only response_format verbose_json holds timestamps", granularities_field)
        granularities = []
    if stream and fmt not in STREAMED_FORMATS:
        raise bad_request(
            f"a streamed transcription sends its text only: use response_format json or text with "
            f"stream=true, not {fmt!r} (or leave stream out)",
            "response_format",
        )
    if task == "translate" and not recognizer.supports_translation:
        raise bad_request(
            "the speech recognition model cannot translate (English-only and turbo models cannot); "
            "the server's operator can set HIGGS_STT_TRANSLATION_MODEL to a multilingual Whisper model "
            "such as large-v3, medium or small (loaded on the first translation), or use "
            "/v1/audio/transcriptions",
            "model",
        )
    recognizer.check_room()  # (a 429 before the upload is read and decoded: the queue would refuse it after)
    data = await read_upload(file, "file", settings)
    try:  # (a client gone meanwhile: a 499, ``errors.py``; the decode stops at its next block)
        audio = await until_disconnected(request, _decoded(data, file.filename, settings))
    except AudioError as exc:
        raise bad_request(str(exc), "file", code="invalid_audio") from None
    if stream:
        return await _streamed(audio, form, language, request, recognizer)
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
        transcript = await until_disconnected(request, work)  # (a client gone: its job dropped or stopped)
    except ValueError as exc:
        raise _invalid_option(exc) from None
    # OpenAI reports whisper-1's usage as the audio's duration; a translation's answer has no usage.
    metered = {"usage": usage(transcript)} if task == "transcribe" else {}
    if fmt == "json":
        return JSONResponse({"text": transcript.text, **metered})
    if fmt == "verbose_json":
        segments = "segment" in granularities or not granularities
        body = to_verbose_json(transcript, task, include_words=words, include_segments=segments)
        return JSONResponse({**body, **metered})
    if fmt == "srt":
        return PlainTextResponse(to_srt(transcript))
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(transcript), media_type="text/vtt")
    return PlainTextResponse(transcript.text + "\n")


def _invalid_option(exc: ValueError) -> APIError:
    """The 400 for an option the recognizer refused."""
    return bad_request(str(exc), "temperature" if "temperature" in str(exc) else "language")


async def _streamed(
    audio: Audio, form: TranslationForm, language: str | None, request: Request, recognizer: AsyncTranscriber
) -> Response:
    """OpenAI's streamed transcription: server-sent ``transcript.text.delta`` events as the segments are
    recognised, then ``transcript.text.done`` with the whole text. The headers go out with the first
    segment (or the end), so that a refused option is still a 400; a client that leaves stops the
    recognition after the segment being decoded, before the headers as after them."""
    events = recognizer.stream(audio, language=language, prompt=form.prompt, temperature=form.temperature)
    try:  # (a client gone: the iterator closed, its job dropped or stopped)
        first = await until_disconnected(request, anext(events))
    except ValueError as exc:
        raise _invalid_option(exc) from None
    return StreamingResponse(_text_events(first, events), media_type="text/event-stream", headers=SSE_HEADERS)


async def _text_events(
    first: Segment | Transcript, events: AsyncIterator[Segment | Transcript]
) -> AsyncIterator[bytes]:
    """The events of ``_streamed``. The deltas joined are the done event's text, which is the unstreamed
    answer's: the first delta has no leading space, and spaces at a segment's end wait for the next
    segment's words (a transcript ends without them)."""
    sent, spaces, item = False, "", first
    try:
        async with aclosing(events):
            while isinstance(item, Segment):
                text = item.text if sent else item.text.lstrip()
                words = text.rstrip()
                if words:
                    yield sse({"type": "transcript.text.delta", "delta": spaces + words})
                    sent, spaces = True, text[len(words) :]
                elif sent:
                    spaces += text
                item = await anext(events)
            yield sse({"type": "transcript.text.done", "text": item.text})
    except Exception as exc:  # after the headers: the stream ends with an error event
        error = as_api_error(exc)
        if isinstance(exc, TranscriberClosed):  # (the server's doing, said once: no traceback)
            log.warning("streamed transcription ended: %s", exc)
        elif error.status >= 500:
            log.exception("streamed transcription failed")
        yield error_event(error.body()["error"], type="error")
