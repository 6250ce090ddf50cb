"""Assembles the service: ``create_app(settings, engine=None, recognizer=None)``.

Run it with ``make run`` (``python app.py``), ``uvicorn app:app`` or ``uvicorn app:build --factory``;
tests build it with ``create_app``. The routes live in ``routes/`` (one module per endpoint family), the
error envelope in ``errors.py``. A request travels: HTTP -> validated ``protocol`` model -> cheap CPU
checks that fail fast (decode audio, resolve the voice) -> the engine's scheduler -> encode -> response.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match

from engine import load_engine
from errors import (
    APIError,
    StreamCut,
    as_api_error,
    error_response,
    install_error_handlers,
    quiet_stream_cuts,
)
from generation import Engine, EngineFailure
from guard import RequestGate
from memory import TrimWhenIdle, give_back, malloc_trim
from metrics import Metrics
from planner import Planner
from routes import chat, docs, health, models, speech, transcription, voices, web
from settings import Settings, check_devices, from_environment
from shutdown import Drain
from streaming import note_errors
from stt import AsyncTranscriber, load_recognizer
from voices import VoiceLibrary, Voices, check_voices_dir

log = logging.getLogger(__name__)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# A client's X-Request-ID is kept when it is a plain token (it ends up in log lines).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(higgs_request_id)s] %(message)s"
# Control characters, as they are escaped in log lines (tabs are left alone): C0 and DEL, C1 (NEL ends a line
# for some readers, CSI starts a terminal's escape) and Unicode's line and paragraph separators (a security
# review forged a line in the log with U+2028, which Python's ``splitlines`` and some viewers break at).
_ESCAPED = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)] if c != 9} | {10: "\\n", 13: "\\r"}
_ESCAPED |= {0x2028: "\\u2028", 0x2029: "\\u2029"}


class OneLineFormatter(logging.Formatter):
    """``LOG_FORMAT``, one line per record whatever its message holds: a client's text that reaches a log
    line (a path with ``%0A`` in it, the name of an unknown JSON field) could otherwise start a line of its
    own and pass for the server's. Control characters are escaped; a traceback still follows its line."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return super().formatMessage(record).translate(_ESCAPED)


UPSTREAM_DEPRECATIONS = r"`torch\.(jit\.script|nn\.utils\.weight_norm)` is deprecated"
"""PyTorch's notices about what upstream's audio codec calls at every load: two WARNING lines at each start
that nobody running the service can act on (a new user took them for a fault)."""


def configure_logging() -> None:
    """INFO and up to standard error in ``LOG_FORMAT``, one line per record (``OneLineFormatter``), Python's
    warnings too (the libraries' deprecation notices came as bare lines between the log's), but for
    ``UPSTREAM_DEPRECATIONS``."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", message=UPSTREAM_DEPRECATIONS, category=FutureWarning)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(OneLineFormatter())


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    recognizer: AsyncTranscriber | None = None,
    *,
    load_behind: bool = True,
) -> FastAPI:
    """Build the app. Without ``engine``/``recognizer``, they are loaded from ``settings`` at start-up:
    behind a server that already answers ``/health`` (``load_behind``), or before it starts serving (where
    something else holds requests back until start-up is done, as Ray Serve does with its replicas)."""
    settings = settings or Settings()
    _install_request_id_on_log_records()
    quiet_stream_cuts()
    app = FastAPI(
        title=docs.TITLE,
        lifespan=_lifespan(settings, engine, recognizer, load_behind),
        redirect_slashes=False,  # a trailing slash is ignored instead (_RequestLine)
        docs_url=None,  # (routes/docs.py serves the pages with their files; FastAPI's load them from a CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.ready = False
    app.state.metrics = Metrics()

    routers = [health, models, chat, speech, voices, transcription, docs, *([web] if settings.web_ui else [])]
    for module in routers:
        app.include_router(module.router)

    install_error_handlers(app)
    _document_settings(app, settings)
    # The last added runs first: request ids (so that CORS preflights have one and are logged), then the
    # request line (HEAD, a trailing slash), then the count of requests in flight (memory is trimmed when
    # none is), then CORS, then the gate.
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(RequestGate, api_key=api_key, max_body_bytes=int(settings.max_body_mb * 1024 * 1024))
    if settings.cors_origins:
        app.add_middleware(
            _Cors,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            # Any request header: SDKs send their own (openai-node's x-stainless-*), and each new
            # version adds some; the origin list is what guards access.
            allow_headers=["*"],
            # What a browser's script may read: ours, and what the openai SDK reads to decide on retries.
            expose_headers=["X-Request-ID", "X-Voice", "X-Voice-Fallback", "Retry-After", "X-Should-Retry"],
        )
    # The routers' routes and FastAPI's own (the OpenAPI schema; an included router is one
    # entry of the app's list, without a path of its own).
    own = [route for route in app.router.routes if getattr(route, "path_format", None)]
    routes = [*own, *(route for module in routers for route in module.router.routes)]
    app.add_middleware(TrimWhenIdle, idle_seconds=settings.idle_trim_seconds)
    app.add_middleware(_RequestLine, routes=routes)
    app.add_middleware(_RequestIds, routes=routes)
    return app


class _RoutesMiddleware:
    """A plain ASGI middleware that knows the app's routes; ``handle`` sees HTTP requests only."""

    def __init__(self, app: Callable[..., Awaitable[None]], routes: list[BaseRoute]):
        self.app = app
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        raise NotImplementedError


def _without_trailing_slash(scope: dict[str, Any]) -> dict[str, Any]:
    """``scope`` with its path's trailing slash dropped (``/v1/audio/speech/`` is ``/v1/audio/speech``)."""
    path = scope["path"]
    if len(path) > 1 and path.endswith("/"):
        scope = {**scope, "path": path.rstrip("/") or "/"}
        scope["raw_path"] = scope["path"].encode()
    return scope


class _RequestLine(_RoutesMiddleware):
    """What a request line names, as HTTP clients expect:

    * ``HEAD`` wherever ``GET`` is served (RFC 9110 asks it of a general-purpose server): the ``GET``'s
      status and headers, no body (it was a 405);
    * a trailing slash ignored (``POST /v1/audio/speech/``): it was a 307 to the same path on whatever
      host the request's ``Host`` header named;
    * a 405's ``Allow`` naming every method the path is served with (it named one route's).
    """

    async def handle(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        given, scope = scope, _without_trailing_slash(scope)
        head = scope["method"] == "HEAD" and not self._serves(scope, "HEAD") and self._serves(scope, "GET")
        if head:
            scope = {**scope, "method": "GET"}

        async def send_line(message: dict[str, Any]) -> None:
            if "route" in scope:  # the route that served it, for the request's log line and metrics
                given.setdefault("route", scope["route"])
            if message["type"] == "http.response.start" and message["status"] == 405:
                headers = MutableHeaders(scope=message)
                headers["allow"] = ", ".join(self._methods(scope))
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, send_line)

    def _serves(self, scope: dict[str, Any], method: str) -> bool:
        return any(r.matches({**scope, "method": method})[0] == Match.FULL for r in self.routes)

    def _methods(self, scope: dict[str, Any]) -> list[str]:
        methods = {
            m for r in self.routes if r.matches(scope)[0] != Match.NONE for m in getattr(r, "methods", ())
        }
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods)


class _Cors(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in OpenAI's error envelope (not plain text)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        error = APIError(
            400,
            f"CORS preflight refused: {refused} not allowed (HIGGS_CORS_ORIGINS lists the origins allowed)",
            code="cors_refused",
        )
        kept = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return JSONResponse(error.body(), status_code=400, headers=kept)


def _lifespan(
    settings: Settings, engine: Engine | None, recognizer: AsyncTranscriber | None, load_behind: bool
) -> Callable[[FastAPI], Any]:
    """Load (or take) the engine and the recognizer, open the voice library, put them on ``app.state``."""

    owned_engine = engine is None
    owned_recognizer = recognizer is None and bool(settings.stt_model)

    async def load(state: Any) -> None:
        # The recognizer first: on a GPU the engine sizes its KV cache to the memory left free.
        state.recognizer = recognizer
        if owned_recognizer:
            state.recognizer = await asyncio.to_thread(load_recognizer, settings)
        state.engine = await asyncio.to_thread(load_engine, settings) if engine is None else engine
        library = await asyncio.to_thread(
            VoiceLibrary,
            settings.voices_dir,
            max_voices=settings.max_voices,
            max_bytes=int(settings.max_voice_library_mb * 1024 * 1024),
        )
        state.voices = Voices(settings, state.engine, state.recognizer, library)
        state.planner = Planner(settings, state.engine, state.recognizer, state.voices)
        if owned_engine and settings.warmup:
            await asyncio.to_thread(state.engine.warm_up)
        if (owned_engine or owned_recognizer) and malloc_trim is not None and settings.idle_trim_seconds:
            await asyncio.to_thread(give_back, malloc_trim, "loaded")  # loading's temporaries
        metrics: Metrics = state.metrics
        metrics.track_queue(lambda: state.engine.pending)
        metrics.track_engine(state.engine)
        state.engine.observers.append(metrics.observe_generation)
        if state.recognizer is not None:
            metrics.track_recognizer(state.recognizer)
        state.ready = True
        log.info("ready: serving %s", settings.served_model_name)

    async def load_or_record_failure(state: Any) -> None:
        try:
            await load(state)
        except Exception as exc:
            state.load_error = exc
            log.critical("loading failed; /health and /ready answer 503", exc_info=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        state.ready = False
        state.load_error = None
        # Models read from disk load behind a listening server, so that /health answers at once and
        # /ready tells when they are there; what was handed in is ready before the first request.
        loading = None
        # Cheap, and a machine without the CUDA asked for should refuse to start, not start failed.
        check_devices(settings, torch.cuda.is_available(), engine=owned_engine, recognizer=owned_recognizer)
        if load_behind and (owned_engine or owned_recognizer):
            loading = asyncio.create_task(load_or_record_failure(state))
        else:
            await load(state)
        state.shutting_down = False
        drain = Drain(
            state,
            settings.shutdown_timeout_seconds,
            lambda: _end_running(state, owned_engine, owned_recognizer),
        )
        drain.install()
        try:
            yield
        finally:
            drain.uninstall()
            state.ready = False
            if loading is not None and not loading.done():
                loading.cancel()  # the thread it waits on finishes by itself; nothing is served from it
            loaded = getattr(state, "engine", None)
            if loaded is not None and state.metrics.observe_generation in loaded.observers:
                loaded.observers.remove(state.metrics.observe_generation)
            if owned_engine and loaded is not None:
                loaded.close()
            heard = getattr(state, "recognizer", None)
            if heard is not None and state.metrics.observe_recognition in getattr(heard, "observers", []):
                heard.observers.remove(state.metrics.observe_recognition)
            if owned_recognizer and heard is not None:
                heard.close()

    return lifespan


def _end_running(state: Any, owned_engine: bool, owned_recognizer: bool) -> None:
    """End what the models the app loaded are doing (``shutdown.py``): the recognitions running or waiting
    stop with ``TranscriberClosed``, and the engine closes, failing its generations with ``engine_closed``;
    each is answered 503 (or ends its stream with an error event)."""
    recognizer = getattr(state, "recognizer", None)
    if owned_recognizer and recognizer is not None:
        recognizer.end_running()
    engine = getattr(state, "engine", None)
    if owned_engine and engine is not None:
        engine.close()


def _document_settings(app: FastAPI, settings: Settings) -> None:
    """Put what settings choose into the OpenAPI schema, where clients (the web page, Swagger UI) read it:
    the speech ``input``'s length is checked by the planner against ``max_input_characters``; an uploaded
    or ``input_audio`` file's size and a voice reference's length, which no field's schema can state, go in
    ``info``'s ``x-higgs-limits``; with an API key, every operation takes a bearer token (Swagger UI's
    Authorize button then asks for it, and sends it with each request tried from ``/docs``)."""
    build_schema = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build_schema()
        speech_input = schema["components"]["schemas"]["SpeechRequest"]["properties"]["input"]
        speech_input["maxLength"] = settings.max_input_characters
        schema["info"]["x-higgs-limits"] = {
            "upload_bytes": int(settings.max_upload_mb * 1024 * 1024),
            "reference_seconds": settings.max_reference_seconds,
        }
        if settings.api_key is not None:
            schema["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"apiKey": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class _RequestIds(_RoutesMiddleware):
    """Give each HTTP request an id (the client's ``X-Request-ID`` when usable), answer it with the id, log
    and count it (when its response starts: the time logged is the time to the first byte; a body sent in
    parts, a stream, gets a second line when it ends: sent whole, or cut short by the client leaving, by a
    failure, or by an ``error`` event, named by its code). A failure
    nothing else answered becomes a 500 envelope with the id; one after the response started goes on to
    the server, which then cuts the body off (a chunked body without its last chunk), so that a client never
    mistakes a broken answer for a whole one. A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware``
    ended such a body as if it were complete."""

    async def handle(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        ended_by, noting = note_errors()
        started = time.perf_counter()
        responded = done = False
        parts = 0  # of the body sent

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal responded, done, parts
            if message["type"] == "http.response.body":
                parts += 1
                done = not message.get("more_body", False)
                if done and parts > 1:
                    how = "sent whole in"
                    if ended_by:  # (its error event: an engine failure, the server shutting down, ...)
                        how = f"cut short by an error ({', '.join(ended_by)}) after"
                    seconds = time.perf_counter() - started
                    log.info("%s %s: stream %s %.3f s", scope["method"], scope["path"], how, seconds)
            elif message["type"] == "http.response.start":
                responded = True
                MutableHeaders(scope=message)["X-Request-ID"] = rid
                scope["app"].state.metrics.observe_request(self._route_of(scope), message["status"])
                log.info(
                    "%s %s -> %d in %.3f s",
                    scope["method"],
                    scope["path"],
                    message["status"],
                    time.perf_counter() - started,
                )
            await send(message)
            if message["type"] == "http.response.body" and message.get("more_body", False):
                # Let the response's watch for a disconnect run: once the client has gone, the server's
                # send returns at once, and a stream whose rest is already queued (its generation done)
                # would otherwise be made and "sent" whole without ever letting it look.
                await asyncio.sleep(0)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if not responded:
                log.exception("unexpected failure")
                await error_response(as_api_error(exc))(scope, receive, send_with_id)
                return
            # A body cut off by a failure: one line, with the request's id, and the server cuts it.
            seconds = time.perf_counter() - started
            failure = next((e for e in (exc, exc.__cause__) if isinstance(e, EngineFailure)), None)
            if failure is not None:  # (a shutdown's engine_closed, an out_of_memory: said, not a bug)
                log.info("%s %s: stream cut short by an error (%s) after %.3f s",
                         scope["method"], scope["path"], failure.code, seconds)  # fmt: skip
            else:
                log.error("%s %s: stream cut short by an unexpected failure after %.3f s",
                          scope["method"], scope["path"], seconds, exc_info=exc)  # fmt: skip
            done = True  # (said)
            raise StreamCut() from exc
        finally:
            if responded and not done and scope["method"] != "HEAD":  # (a HEAD's answer is its head)
                seconds = time.perf_counter() - started
                log.info("%s %s: stream cut short after %.3f s (the client left, a failure or a shutdown)",
                         scope["method"], scope["path"], seconds)  # fmt: skip
            request_id.reset(token)
            noting.var.reset(noting)

    def _route_of(self, scope: dict[str, Any]) -> str:
        """The route a request is counted under: the one that served it, or for an answer given before
        routing (the gate's 401 and 413, a CORS preflight) the route its path and method would reach; else
        ``unmatched``. Always a route's own template, so the metric's labels stay few."""
        route = scope.get("route")
        if route is None:
            scope = _without_trailing_slash(scope)  # as ``_RequestLine`` routes it (after these answers)
            matches = [(r.matches(scope)[0], r) for r in self.routes]
            route = next((r for m, r in matches if m == Match.FULL), None) or next(
                (r for m, r in matches if m == Match.PARTIAL), None
            )
        return getattr(route, "path_format", "unmatched")


def _install_request_id_on_log_records() -> None:
    """Give every log record a ``higgs_request_id`` attribute (``-`` outside a request). Not
    ``request_id``: a library that passes its own in ``extra`` (Ray Serve's access log does) would then
    fail, as logging refuses an ``extra`` that overwrites a record's attribute."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "adds_request_id", False):
        return

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.higgs_request_id = request_id.get()
        return record

    make_record.adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_record)


def _startable(settings: Settings) -> Settings:
    """``settings``, unless the device they ask for is missing or the voices folder cannot hold voices:
    then the process stops at once with one line that says why (the app's start would refuse a device too,
    with a server's traceback around it; a folder it would find only after the models had loaded)."""
    try:
        check_devices(settings, torch.cuda.is_available())
        check_voices_dir(settings.voices_dir)
    except RuntimeError as exc:
        raise SystemExit(f"cannot start: {exc}") from None
    return settings


def build() -> FastAPI:
    """The app with the settings of the environment: ``uvicorn app:build --factory``. Logs as ``python
    app.py`` does: uvicorn's own lines through the root logger, in this format, and no access log (each
    request is logged with its id already); uvicorn has set up its loggers by the time it calls this."""
    configure_logging()
    for name in ("uvicorn", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    return create_app(_startable(from_environment()))


def __getattr__(name: str) -> FastAPI:
    """``uvicorn app:app`` (how FastAPI apps are usually started): ``build()``'s app, made when asked for,
    so that importing this module reads no settings and loads nothing."""
    if name == "app":
        return build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """``python app.py``: serve on the settings' host and port (``server.py``)."""
    from server import serve

    settings = _startable(from_environment())
    configure_logging()
    _install_request_id_on_log_records()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
