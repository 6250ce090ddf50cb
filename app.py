"""The FastAPI app: ``create_app(settings, engine=None)``, its lifespan, thin routes and error handlers.

Run it with ``make run`` (``python app.py``), or ``uvicorn app:app``; tests build it with ``create_app``.
A request travels: HTTP -> validated ``protocol`` model -> cheap CPU checks that fail fast (decode audio,
resolve the voice) -> the engine's single worker -> encode -> response.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from audio import MEDIA_TYPES, AudioError, decode_audio
from engine import (
    ContextLengthError,
    Engine,
    EngineBusy,
    EngineFailure,
    GenerationResult,
    Started,
    StreamEvent,
    TextPiece,
)
from guard import Guard
from longform import encode_whole, speak
from metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from metrics import Metrics
from planner import Planner
from protocol import (
    APIError,
    AssistantMessage,
    AudioOut,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ModelCard,
    ModelList,
    SpeechRequest,
    Usage,
    bad_request,
)
from settings import Settings, resolve_device
from streaming import chat_events, speech_audio, speech_events, usage_of
from stt import AsyncTranscriber, TranscriberBusy, to_srt, to_verbose_json, to_vtt
from voice_cloning import InvalidReference, VoiceLibrary

log = logging.getLogger(__name__)

# Model names OpenAI clients hard-code; each is served by the one loaded model.
MODEL_ALIASES = (
    "gpt-4o-audio-preview",
    "gpt-4o-mini-audio-preview",
    "tts-1",
    "tts-1-hd",
    "gpt-4o-mini-tts",
    "whisper-1",
)
AUDIO_LIFETIME_SECONDS = 3600
TRANSCRIPT_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# A client's X-Request-ID is kept when it is a plain token (it ends up in log lines).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _install_request_id_on_log_records() -> None:
    """Give every log record a ``request_id`` attribute (``-`` outside a request)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "adds_request_id", False):
        return

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.request_id = request_id.get()
        return record

    make_record.adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_record)


_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """``('body', 'messages', 0, 'content', 1, 'input_audio', 'input_audio', 'data')`` -> dotted path."""
    parts: list[Any] = [p for p in loc if p != "body"]
    path = ""
    previous: Any = None
    for p in parts:
        if isinstance(p, int):
            path += f"[{p}]"
        elif "[" in str(p) or p in _UNION_MEMBERS or p == previous:
            # Union member names pydantic inserts ('str', 'list[...]', a tagged union's tag) are not fields.
            pass
        else:
            path += f".{p}" if path else str(p)
        previous = p
    return path or None


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _validation_message(err: dict[str, Any]) -> str:
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    if err.get("type") == "missing":
        return "this field is required"
    if err.get("type") == "union_tag_invalid":
        expected = err.get("ctx", {}).get("expected_tags", "text or input_audio")
        return f"unsupported content part type; use {expected}"
    return str(err.get("msg", "invalid value"))


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    recognizer: AsyncTranscriber | None = None,
) -> FastAPI:
    """Build the app. Without ``engine``/``recognizer``, they are loaded from ``settings`` at start-up."""
    settings = settings or Settings()
    _install_request_id_on_log_records()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        state.ready = False
        owned_engine = engine is None
        if engine is None:
            state.engine = await asyncio.to_thread(load_engine, settings)
        else:
            state.engine = engine
        state.recognizer = recognizer
        if recognizer is None and settings.stt_model:
            state.recognizer = await asyncio.to_thread(load_recognizer, settings)
        library = await asyncio.to_thread(
            VoiceLibrary,
            settings.voices_dir,
            max_voices=settings.max_voices,
            max_bytes=int(settings.max_voice_library_mb * 1024 * 1024),
        )
        state.planner = Planner(settings, state.engine, state.recognizer, library)
        if owned_engine and settings.warmup:
            await asyncio.to_thread(state.engine.warm_up)
        metrics.track_queue(lambda: state.engine.pending)
        state.engine.observers.append(metrics.observe_generation)
        state.ready = True
        log.info("ready: serving %s", settings.served_model_name)
        try:
            yield
        finally:
            state.ready = False
            state.engine.observers.remove(metrics.observe_generation)
            if owned_engine:
                state.engine.close()
            if state.recognizer is not None and recognizer is None:
                state.recognizer.close()

    app = FastAPI(title="Higgs Audio OpenAI-compatible server", lifespan=lifespan)
    app.state.settings = settings
    app.state.ready = False
    metrics = Metrics()
    app.state.metrics = metrics
    served_names = {settings.served_model_name, *MODEL_ALIASES}
    max_upload_bytes = int(settings.max_upload_mb * 1024 * 1024)

    # ---- cross-cutting (the last added runs first: CORS, then request ids, then the guard) ----

    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=int(settings.max_body_mb * 1024 * 1024))

    @app.middleware("http")
    async def with_request_id(request: Request, call_next):
        given = request.headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        started = time.perf_counter()
        try:
            response = await call_next(request)
            response.headers["X-Request-ID"] = rid
            route = request.scope.get("route")
            metrics.observe_request(getattr(route, "path", "unmatched"), response.status_code)
            log.info(
                "%s %s -> %d in %.3f s",
                request.method,
                request.url.path,
                response.status_code,
                time.perf_counter() - started,
            )
            return response
        finally:
            request_id.reset(token)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Voice", "X-Voice-Fallback"],
        )

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(InvalidReference)
    async def on_invalid_reference(request: Request, exc: InvalidReference) -> JSONResponse:
        return _error_response(APIError(400, str(exc), param=exc.param, code="invalid_audio"))

    @app.exception_handler(EngineBusy)
    @app.exception_handler(TranscriberBusy)
    async def on_busy(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(
            APIError(429, str(exc), type="rate_limit_error", code="queue_full", headers={"Retry-After": "2"})
        )

    @app.exception_handler(EngineFailure)
    async def on_engine_failure(request: Request, exc: EngineFailure) -> JSONResponse:
        status = 503 if exc.code == "engine_failed" else 500
        return _error_response(APIError(status, str(exc), type="server_error", code=exc.code))

    @app.exception_handler(ContextLengthError)
    async def on_context_length(request: Request, exc: ContextLengthError) -> JSONResponse:
        return _error_response(APIError(400, str(exc), param="max_tokens", code="context_length_exceeded"))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Of a union's alternatives, the deepest error is the one closest to what the client meant.
        err = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={})
        param = None if err.get("type") == "json_invalid" else _param_from_loc(tuple(err.get("loc", ())))
        return _error_response(APIError(400, _validation_message(err), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected failure")
        return _error_response(
            APIError(500, "the server failed to handle this request; see its log", type="server_error")
        )

    def check_model(name: str) -> None:
        if name not in served_names:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {settings.served_model_name!r} "
                f"(also accepted: {', '.join(MODEL_ALIASES)})",
                param="model",
                code="model_not_found",
            )

    async def read_upload(upload: UploadFile, param: str) -> bytes:
        """An uploaded file's bytes; 413 past ``max_upload_mb`` (read no further than that)."""
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise APIError(413, f"the {param} is larger than {settings.max_upload_mb:g} MB", param=param)
        return data

    def log_ignored(body: Any) -> None:
        if body.model_extra:
            log.info("ignored unknown request fields: %s", ", ".join(sorted(body.model_extra)))

    def require_ready(request: Request, generation: bool = True) -> None:
        """503 until ready or after an engine failure; generation routes also get 429 on a full queue."""
        engine = getattr(request.app.state, "engine", None)
        if engine is not None and engine.failure:
            raise APIError(
                503,
                "the engine failed and the service needs a restart",
                type="server_error",
                code="engine_failed",
            )
        if generation and engine is not None and engine.pending >= engine.max_queue:
            raise EngineBusy(f"the server is busy ({engine.pending} requests queued); retry shortly")
        if not request.app.state.ready:
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                type="server_error",
                headers={"Retry-After": "5"},
            )

    # ---- routes ----

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness: models loaded and warmed up, and the engine has not failed."""
        engine = getattr(request.app.state, "engine", None)
        if engine is not None and engine.failure:
            return JSONResponse(
                {"ready": False, "reason": "engine failed; restart the service"}, status_code=503
            )
        is_ready = bool(request.app.state.ready)
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus metrics (behind the API key when one is set)."""
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        now = int(time.time())
        return ModelList(
            data=[ModelCard(id=name, created=now) for name in [settings.served_model_name, *MODEL_ALIASES]]
        )

    @app.get("/v1/models/{model_id}", response_model=ModelCard)
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id)
        return ModelCard(id=model_id, created=int(time.time()))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=False)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        require_ready(request)
        log_ignored(body)
        check_model(body.model)
        if body.stream and body.wants_audio and body.audio and body.audio.format != "pcm16":
            raise bad_request("streamed audio is pcm16; set audio.format to pcm16", "audio.format")
        state = request.app.state
        plan = await state.planner.plan(body)
        headers = {"X-Voice": plan.voice}
        if plan.fallback:
            headers["X-Voice-Fallback"] = f"default; reason={plan.fallback}"
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        join_ms = settings.join_fade_ms
        if body.stream:
            if plan.script is not None:  # long-form: an audio answer, spoken in pieces
                events = speak(state.engine, plan.script, join_ms)
            else:
                events = (
                    state.engine.stream(plan.request) if plan.request else _answer_events(plan.direct_answer)
                )
            await _started(events)
            body_stream = chat_events(
                events,
                completion_id=completion_id,
                created=created,
                model=body.model,
                audio_id="audio_" + uuid.uuid4().hex if body.wants_audio else None,
                transcript=plan.spoken_text,
                expires_at=created + AUDIO_LIFETIME_SECONDS,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
            )
            return StreamingResponse(body_stream, media_type="text/event-stream", headers=headers)
        if plan.script is not None:
            # Long-form, and any audio answer: encoded as it is decoded, in bounded memory.
            fmt = body.audio.format if body.audio else "wav"
            events = speak(state.engine, plan.script, join_ms)
            data, result = await encode_whole(events, fmt, state.engine.sample_rate)
        elif plan.request is None:
            result = _answer(plan.direct_answer)
        else:
            result = await state.engine.generate(plan.request)
        if plan.script is not None:
            audio_out = AudioOut(
                id="audio_" + uuid.uuid4().hex,
                data=base64.b64encode(data).decode("ascii"),
                expires_at=created + AUDIO_LIFETIME_SECONDS,
                transcript=plan.spoken_text,
            )
            message = AssistantMessage(content=None, audio=audio_out)
        else:
            message = AssistantMessage(content=result.text)
        choice = Choice(message=message, finish_reason=result.finish_reason)
        usage = Usage(**usage_of(result))
        completion = ChatCompletion(
            id=completion_id, created=created, model=body.model, choices=[choice], usage=usage
        )
        return JSONResponse(completion.model_dump(mode="json"), headers=headers)

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest, request: Request) -> Response:
        """OpenAI's text-to-speech endpoint: the body is the audio in ``response_format``."""
        require_ready(request)
        log_ignored(body)
        check_model(body.model)
        state = request.app.state
        plan = await state.planner.plan_speech(body)
        events = speak(state.engine, plan.script, settings.join_fade_ms)  # long-form: in pieces
        await _started(events)
        headers = {"X-Voice": plan.voice}
        rate = state.engine.sample_rate
        if body.stream_format == "sse":
            stream = speech_events(events, body.response_format, body.speed, rate)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        stream = speech_audio(events, body.response_format, body.speed, rate)
        return StreamingResponse(stream, media_type=MEDIA_TYPES[body.response_format], headers=headers)

    @app.post("/v1/audio/voices")
    async def create_voice(
        request: Request,
        name: Annotated[str, Form()],
        audio_sample: Annotated[UploadFile, File()],
        transcript: Annotated[str | None, Form()] = None,
        consent: Annotated[str | None, Form()] = None,
    ) -> JSONResponse:
        """Store a voice from an audio sample (multipart, as OpenAI's custom voices)."""
        require_ready(request)
        data = await read_upload(audio_sample, "audio_sample")
        voice = await request.app.state.planner.create_voice(name, data, transcript)
        log.info("stored voice %r (%.1f s)", voice.name, voice.duration)
        return JSONResponse(voice.public())

    @app.get("/v1/audio/voices")
    async def list_voices(request: Request) -> JSONResponse:
        """Every stored voice."""
        voices = await asyncio.to_thread(request.app.state.planner.library.list)
        return JSONResponse({"object": "list", "data": [v.public() for v in voices]})

    @app.get("/v1/audio/voices/{voice_id}")
    async def get_voice(voice_id: str, request: Request) -> JSONResponse:
        """One stored voice, by id or name."""
        voice = await asyncio.to_thread(request.app.state.planner.library.get, voice_id)
        if voice is None:
            raise APIError(404, f"no voice {voice_id!r}", param="voice_id", code="voice_not_found")
        return JSONResponse(voice.public())

    @app.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(voice_id: str, request: Request) -> JSONResponse:
        """Remove a stored voice, by id or name."""
        voice = await request.app.state.planner.delete_voice(voice_id)
        return JSONResponse({"id": voice.id, "object": "audio.voice.deleted", "deleted": True})

    async def speech_to_text(
        request: Request,
        task: str,
        file: UploadFile,
        model: str,
        language: str | None,
        prompt: str | None,
        response_format: str,
        temperature: float,
        granularities: list[str],
    ) -> Response:
        """Shared body of /v1/audio/transcriptions and /v1/audio/translations."""
        require_ready(request, generation=False)
        check_model(model)
        recognizer: AsyncTranscriber | None = request.app.state.recognizer
        if recognizer is None:
            raise APIError(
                400,
                "speech recognition is turned off on this server (HIGGS_STT_MODEL is empty)",
                param="model",
            )
        if response_format not in TRANSCRIPT_FORMATS:
            raise bad_request(
                f"unknown response_format {response_format!r}; use one of: {', '.join(TRANSCRIPT_FORMATS)}",
                "response_format",
            )
        unknown = set(granularities) - {"segment", "word"}
        if unknown:
            raise bad_request(
                f"unknown timestamp granularity {sorted(unknown)[0]!r}; use segment or word",
                "timestamp_granularities[]",
            )
        if granularities and response_format != "verbose_json":
            raise bad_request(
                "timestamp_granularities needs response_format verbose_json", "timestamp_granularities[]"
            )
        if task == "translate" and not recognizer.supports_translation:
            raise bad_request(
                "the loaded speech recognition model cannot translate; use /v1/audio/transcriptions", "model"
            )
        data = await read_upload(file, "file")
        try:
            audio = await asyncio.to_thread(
                decode_audio,
                data,
                target_rate=16000,
                max_seconds=settings.max_transcription_seconds,
                format_hint=Path(file.filename or "").suffix.lstrip(".") or None,
            )
        except AudioError as exc:
            raise bad_request(str(exc), "file") from None
        words = "word" in granularities
        try:
            transcript = await recognizer.transcribe(
                audio,
                language=language,
                prompt=prompt,
                temperature=temperature,
                task=task,
                word_timestamps=words,
            )
        except ValueError as exc:
            param = "temperature" if "temperature" in str(exc) else "language"
            raise bad_request(str(exc), param) from None
        if response_format == "json":
            return JSONResponse({"text": transcript.text})
        if response_format == "verbose_json":
            segments = "segment" in granularities or not granularities
            return JSONResponse(
                to_verbose_json(transcript, task, include_words=words, include_segments=segments)
            )
        if response_format == "srt":
            return PlainTextResponse(to_srt(transcript))
        if response_format == "vtt":
            return PlainTextResponse(to_vtt(transcript), media_type="text/vtt")
        return PlainTextResponse(transcript.text + "\n")

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        request: Request,
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form()],
        language: Annotated[str | None, Form()] = None,
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[str, Form()] = "json",
        temperature: Annotated[float, Form()] = 0.0,
        timestamp_granularities: Annotated[list[str], Form(alias="timestamp_granularities[]")] = [],  # noqa: B006
        stream: Annotated[bool, Form()] = False,
    ) -> Response:
        """OpenAI's transcription endpoint (multipart form)."""
        if stream:
            raise bad_request("streamed transcription is not supported yet; send stream=false", "stream")
        return await speech_to_text(
            request,
            "transcribe",
            file,
            model,
            language,
            prompt,
            response_format,
            temperature,
            timestamp_granularities,
        )

    @app.post("/v1/audio/translations")
    async def translations(
        request: Request,
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form()],
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[str, Form()] = "json",
        temperature: Annotated[float, Form()] = 0.0,
    ) -> Response:
        """OpenAI's translation endpoint: speech in any language the model knows, English text out."""
        return await speech_to_text(
            request, "translate", file, model, None, prompt, response_format, temperature, []
        )

    return app


async def _started(events: AsyncIterator[StreamEvent]) -> None:
    """Wait for generation to start, so that errors found while preparing it are answered as errors."""
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    if not isinstance(first, Started):
        await events.aclose()
        raise RuntimeError(f"the engine's stream began with {type(first).__name__}")


def _answer(text: str | None) -> GenerationResult:
    """The result of an answer that needs no generation (the transcript of audio in a text-only chat)."""
    return GenerationResult(text or "", None, "stop", 0, 0, 0, 0, 0.0)


async def _answer_events(text: str | None) -> AsyncIterator[StreamEvent]:
    """``_answer`` as a stream."""
    yield Started(0, 0)
    if text:
        yield TextPiece(text)
    yield _answer(text)


def load_engine(settings: Settings) -> Engine:
    """Load Higgs Audio as the settings say (blocking; minutes for the real model)."""
    import torch

    from engine import HiggsEngine, StreamSettings

    device = resolve_device(settings.device, torch.cuda.is_available())
    streaming = StreamSettings(
        first_chunk_frames=settings.stream_first_chunk_frames,
        chunk_frames=settings.stream_chunk_frames,
        context_frames=settings.stream_context_frames,
        crossfade_ms=settings.stream_crossfade_ms,
    )
    return HiggsEngine(
        settings.model,
        settings.audio_tokenizer,
        device,
        settings.dtype,
        settings.kv_cache_lengths,
        streaming,
        max_queue=settings.max_queue,
    )


def load_recognizer(settings: Settings) -> AsyncTranscriber:
    """Load faster-whisper as the settings say and warm it up (blocking).

    With ``stt_device=auto`` on a GPU whose CUDA libraries CTranslate2 cannot load (its PyPI wheels need
    CUDA 12's cuBLAS), recognition falls back to the CPU with a warning instead of failing the start-up.
    """
    from stt import WhisperTranscriber

    def load(device: str) -> WhisperTranscriber:
        transcriber = WhisperTranscriber(
            settings.stt_model, device=device, compute_type=settings.stt_compute_type
        )
        transcriber.warm_up()
        return transcriber

    try:
        return AsyncTranscriber(load(settings.stt_device), max_pending=settings.max_queue)
    except RuntimeError as exc:
        if settings.stt_device != "auto" or not _cuda_available():
            raise
        log.warning(
            "speech recognition could not run on CUDA (%s); running it on the CPU instead. "
            "See the README's 'Speech recognition on a GPU'.",
            exc,
        )
        return AsyncTranscriber(load("cpu"), max_pending=settings.max_queue)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    """``python app.py``: serve on the settings' host and port."""
    import uvicorn

    settings = Settings()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
    )
    _install_request_id_on_log_records()
    # access_log off: the request-id middleware already logs each request, with its id.
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_config=None, access_log=False
    )


def __getattr__(name: str) -> Any:
    # `uvicorn app:app` reads this attribute; building it lazily keeps settings out of import time.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)


if __name__ == "__main__":
    main()
