"""What the routes share, reached per request through ``Depends``: the serving objects on ``app.state``
(built by the lifespan in ``app.py``), readiness, and the model-name check; and the static files of the
pages (``StaticFiles``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, UploadFile
from fastapi.responses import FileResponse

from errors import APIError, ClientDisconnected
from generation import Engine, EngineBusy, EngineFailure
from metrics import Metrics
from planner import Planner
from protocol import InvalidRequest
from settings import Settings
from stt import AsyncTranscriber
from voices import Voices

log = logging.getLogger(__name__)


class StaticFiles:
    """The files of ``folder`` whose suffixes ``content_types`` names, looked up by exact name: no path from
    a URL ever reaches the disk. ``what`` names them in a 404; ``headers`` go with each."""

    def __init__(
        self, folder: Path, content_types: dict[str, str], what: str, headers: dict[str, str] | None = None
    ):
        self.content_types = content_types
        self.what = what
        self.headers = headers
        found = folder.iterdir() if folder.is_dir() else ()
        self.files = {p.name: p for p in found if p.suffix in content_types}

    def response(self, name: str) -> FileResponse:
        path = self.files.get(name)
        if path is None:
            raise APIError(404, f"no file {name!r} in {self.what}", type="not_found_error")
        return FileResponse(path, media_type=self.content_types[path.suffix], headers=self.headers)


# Model names OpenAI clients hard-code; each is served by the one loaded model, and so is a dated snapshot of
# each (``gpt-4o-mini-tts-2025-03-20``, or month and day alone as in ``tts-1-1106``).
MODEL_ALIASES = (
    "gpt-4o-audio-preview",
    "gpt-4o-mini-audio-preview",
    "gpt-audio",
    "gpt-audio-mini",
    "tts-1",
    "tts-1-hd",
    "gpt-4o-mini-tts",
    "whisper-1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
)
# The hub id Boson's own examples send as the model (and its basename).
HIGGS_MODEL_NAMES = ("bosonai/higgs-audio-v2-generation-3B-base", "higgs-audio-v2-generation-3B-base")
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")
# Seconds a client is told to wait while the model loads.
LOADING_RETRY_AFTER = 5


def get_settings(request: Request) -> Settings:
    """The service's settings."""
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    """The generation engine."""
    return request.app.state.engine


def get_planner(request: Request) -> Planner:
    """Turns requests into generations."""
    return request.app.state.planner


def get_voices(request: Request) -> Voices:
    """The voice library."""
    return request.app.state.voices


def get_recognizer(request: Request) -> AsyncTranscriber | None:
    """Speech recognition, or None when it is turned off."""
    return request.app.state.recognizer


def get_metrics(request: Request) -> Metrics:
    """The Prometheus metrics."""
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
PlannerDep = Annotated[Planner, Depends(get_planner)]
VoicesDep = Annotated[Voices, Depends(get_voices)]
RecognizerDep = Annotated[AsyncTranscriber | None, Depends(get_recognizer)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def require_ready(request: Request) -> None:
    """503 until the models are loaded and warmed up, and after a loading or engine failure."""
    engine = getattr(request.app.state, "engine", None)
    if engine is not None and engine.failure:  # (its 503 says not to retry: ``errors.as_api_error``)
        raise EngineFailure("the engine failed and the service needs a restart", "engine_failed")
    if getattr(request.app.state, "load_error", None):  # no wait mends it: no Retry-After, no retries
        raise APIError(
            503,
            "the service could not load its models: it needs a restart once its log's cause is mended",
            type="server_error",
            code="load_failed",
            headers={"x-should-retry": "false"},  # the openai SDK retries a 503 unless told not to
        )
    if not request.app.state.ready:
        raise APIError(
            503,
            "the model is still loading; retry shortly",
            type="server_error",
            code="model_loading",
            headers={"Retry-After": str(LOADING_RETRY_AFTER)},
        )


def require_generation_slot(request: Request) -> None:
    """``require_ready``, and 429 at once when the engine's queue is full (nothing is read or decoded)."""
    engine = getattr(request.app.state, "engine", None)
    if engine is not None and not engine.failure and engine.pending >= engine.max_queue:
        raise EngineBusy.full(
            engine.pending, getattr(engine, "retry_after", 2.0), getattr(engine, "finishing", 0)
        )
    require_ready(request)


def check_model(settings: Settings, name: str) -> None:
    """404 unless ``name`` is the served model or one of the aliases."""
    accepted = {settings.served_model_name, settings.model, *MODEL_ALIASES, *HIGGS_MODEL_NAMES}
    if name not in accepted and _SNAPSHOT.sub("", name) not in MODEL_ALIASES:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {settings.served_model_name!r} "
            f"(also accepted: {', '.join(_others(settings))}, and OpenAI's names with a date, such as "
            "gpt-4o-audio-preview-2025-06-03)",
            param="model",
            code="model_not_found",
        )


def _others(settings: Settings) -> list[str]:
    """The names besides the served one that ``check_model`` accepts, each once, in order; the model's
    setting only when it is a hub id (a local folder's path is the server's business, not its clients')."""
    local = Path(settings.model).expanduser().exists()
    names = [*([] if local else [settings.model]), *HIGGS_MODEL_NAMES, *MODEL_ALIASES]
    return [n for n in dict.fromkeys(names) if n != settings.served_model_name]


def log_ignored(body: Any) -> None:
    """Log the unknown fields a request carried (they are accepted and ignored)."""
    if body.model_extra:
        log.info("ignored unknown request fields: %s", ", ".join(sorted(body.model_extra)))


async def read_upload(upload: UploadFile, param: str, settings: Settings) -> bytes:
    """An uploaded file's bytes; 413 past ``max_upload_mb`` (read no further than that)."""
    limit = int(settings.max_upload_mb * 1024 * 1024)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise APIError(
            413,
            f"the {param} is larger than {settings.max_upload_mb:.3g} MB",
            param=param,
            code="file_too_large",
        )
    return data


T = TypeVar("T")


# Form fields a client may repeat: OpenAI's clients send each granularity as a ``[]`` field of its own.
REPEATABLE_FIELDS = frozenset({"timestamp_granularities[]", "timestamp_granularities", "include[]"})


async def each_field_once(request: Request, files: tuple[str, ...] = ()) -> None:
    """Refuse a form field given more than once (400 naming it). The form's parser keeps the last of them,
    so a second ``name`` named the voice and a second ``response_format`` chose the answer's, silently (a
    hostile-input trial); ``files`` are the file fields, said as parts."""
    counts = Counter(name for name, _ in (await request.form()).multi_items())
    for name, count in counts.items():
        if count > 1 and name not in REPEATABLE_FIELDS:
            if name in files:
                raise InvalidRequest(f"send one {name}: the request has {count} {name} parts", name)
            raise InvalidRequest(f"{name} is given {count} times; send it once", name)


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``, cancelling it when the client disconnects (the engine then frees its slot).

    A non-streamed answer is computed before anything is sent, so only the connection tells that its
    client gave up. Raises ``ClientDisconnected`` in that case.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()  # leaves the engine's stream (its slot is freed), drops a job still in a line
            await asyncio.wait({task})  # done before the answer goes out, so nobody runs it after
    if task.cancelled():
        raise ClientDisconnected
    return task.result()
