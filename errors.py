"""Every failure a client hears about, in OpenAI's error envelope, and nowhere else.

``error_body`` is the one builder of ``{"error": {"message", "type", "param", "code"}}``; the exception
handlers, the door checks (``guard.py``) and the SSE error events (``streaming.py``) all use it. The
modules below the HTTP layer raise domain errors (a voice that does not exist, a full queue, a reference
that is not audio, ...); ``install_error_handlers`` maps each to its HTTP status here.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from generation import ContextLengthError, EngineBusy, EngineFailure
from protocol import CONTENT_PART_TYPES, InvalidRequest, half_surrogate
from stt import TranscriberBusy, TranscriberClosed, TranslatorUnavailable
from voice_cloning import InvalidAudio
from voices import BuiltinVoiceFailed, InvalidVoiceName, VoiceExists, VoiceNotFound, VoiceQuotaExceeded

log = logging.getLogger(__name__)

# Seconds a client is told to wait when a queue is full, unless the error says otherwise.
DEFAULT_RETRY_AFTER = 2
# Seconds a client is told to wait when the server is shutting down (a replica, or the same one restarted).
RESTART_RETRY_AFTER = 5
# Engine failures answered 503, with what the client is told about retrying: a failed engine fails for good
# (the openai SDK would retry a 503 unless told not to); one shutting down may be asked again (another
# replica, or the same once restarted).
_UNAVAILABLE = {
    "engine_failed": {"x-should-retry": "false"},
    "engine_closed": {"Retry-After": str(RESTART_RETRY_AFTER)},
}


# The longest error message said whole: an unknown voice's 400 names up to 24 voices of 64 characters.
MESSAGE_CHARACTERS = 2_000


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope, exactly; a message past ``MESSAGE_CHARACTERS`` (a client's value said back
    whole: a model or voice name of megabytes) cut in its middle, where such a value stands."""
    if len(message) > MESSAGE_CHARACTERS:
        head, tail = MESSAGE_CHARACTERS * 2 // 3, MESSAGE_CHARACTERS // 4
        message = (
            f"{message[:head]} … ({len(message) - head - tail:,} characters left out) … {message[-tail:]}"
        )
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """A failure reported to the client with ``status`` and OpenAI's error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return error_body(self.message, self.type, self.param, self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)


def as_api_error(exc: Exception) -> APIError:
    """The HTTP face of a domain error (anything else is a 500 that says to read the log)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, InvalidAudio):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, InvalidVoiceName):
        return APIError(400, str(exc), param="name")
    if isinstance(exc, VoiceNotFound):
        return APIError(404, str(exc), param=exc.param, code="voice_not_found")
    if isinstance(exc, VoiceExists):
        # The openai SDK retries a 409 unless told not to: the name stays taken however often it is sent.
        return APIError(409, str(exc), param="name", code="voice_exists", headers={"x-should-retry": "false"})
    if isinstance(exc, VoiceQuotaExceeded):
        return APIError(413, str(exc), param=exc.param, code="voice_quota_exceeded")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, EngineBusy | TranscriberBusy):
        retry_after = getattr(exc, "retry_after", DEFAULT_RETRY_AFTER)
        return APIError(
            429,
            str(exc),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
        )
    if isinstance(exc, EngineFailure):
        if exc.code in _UNAVAILABLE:
            return APIError(503, str(exc), type="server_error", code=exc.code, headers=_UNAVAILABLE[exc.code])
        return APIError(500, str(exc), type="server_error", code=exc.code)
    if isinstance(exc, TranscriberClosed):  # (as a generation ended by the shutdown is answered)
        return APIError(
            503, str(exc), type="server_error", code="engine_closed", headers=_UNAVAILABLE["engine_closed"]
        )
    if isinstance(exc, TranslatorUnavailable):
        return APIError(503, str(exc), type="server_error", code="model_unavailable")
    if isinstance(exc, BuiltinVoiceFailed):
        return APIError(500, str(exc), type="server_error")
    return APIError(500, "the server failed to handle this request; see its log", type="server_error")


DOMAIN_ERRORS: tuple[type[Exception], ...] = (
    APIError,
    InvalidRequest,
    InvalidAudio,
    InvalidVoiceName,
    VoiceNotFound,
    VoiceExists,
    VoiceQuotaExceeded,
    ContextLengthError,
    EngineBusy,
    TranscriberBusy,
    TranscriberClosed,
    TranslatorUnavailable,
    EngineFailure,
    BuiltinVoiceFailed,
)


def error_response(error: APIError) -> JSONResponse:
    """``error`` as a response."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# Union member names pydantic puts in an error's location ('str', 'list[...]', a tagged union's tag, a
# model's class name such as 'VoiceRef': no field of the API is capitalised).
_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "dict", "list"}


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """``('body', 'messages', 0, 'content', 1, 'input_audio', 'input_audio', 'data')`` -> dotted path."""
    parts: list[Any] = [p for p in loc if p != "body"]
    path = ""
    previous: Any = None
    for p in parts:
        if isinstance(p, int):
            path += f"[{p}]"
        elif "[" in str(p) or p in _UNION_MEMBERS or str(p)[:1].isupper() or p == previous:
            pass
        else:
            path += f".{p}" if path else str(p)
        previous = p
    return path or None


# Pydantic's checks of a value's type, and what the value must be instead.
_TYPES = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
    "list_type": "an array", "dict_type": "an object", "model_type": "an object",
    "model_attributes_type": "an object",
}  # fmt: skip
# Pydantic's bounds on a number, and the words and OpenAI's code (by the number's kind) for each.
_BOUNDS = {
    "greater_than": ("above", "below_min"),
    "greater_than_equal": ("at least", "below_min"),
    "less_than": ("below", "above_max"),
    "less_than_equal": ("at most", "above_max"),
}


def _given(value: Any) -> str:
    """A value as the client wrote it (JSON), shortened when long."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}…"


def _validation_answer(
    err: dict[str, Any], param: str | None, multipart: bool = False
) -> tuple[str, str | None]:
    """Pydantic's error as this API says it: a message naming the field, what it must be and what was
    given, and OpenAI's code for the kind of fault (``integer_above_max_value``, ``invalid_type``, ...)."""
    kind, ctx, given = err.get("type"), err.get("ctx", {}), err.get("input")
    name = param or "the request body"
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if kind == "missing":
        if tuple(err.get("loc", ())) == ("body",):  # (no body at all: no field to name)
            return "the request body is empty; send a JSON object", None
        return f"{param or 'a field'} is required", "missing_required_parameter"
    if kind == "string_unicode" and isinstance(given, str):  # (a bounded field's)
        half = half_surrogate(given) or "the text is not valid Unicode"
        if param is None:  # (a field's name: pydantic gives it no place)
            return half.replace("the text", f"a field's name ({given!r})", 1), None
        return half, None
    if kind == "union_tag_not_found":  # a content part without its "type"
        kinds = ", ".join(repr(kind) for kind in CONTENT_PART_TYPES)
        return f"this content part has no type; give it one of {kinds}", None
    if kind == "union_tag_invalid":
        expected = ctx.get("expected_tags", "text or input_audio")
        return f"unsupported content part type; use {expected}", "invalid_value"
    if kind == "value_error":  # a validator's own words, without pydantic's "Value error, "
        message = str(ctx.get("error", err.get("msg", "invalid value")))
        if message.startswith("Expected UploadFile"):  # text sent where a form wants a file
            if not multipart:
                return "this field must be a file, sent as multipart/form-data", "invalid_type"
            # (to the form's parser, a part without a filename is a text field)
            return (
                f"{name} must be a file: its part's Content-Disposition has no filename; add one",
                "invalid_type",
            )
        return message, None
    if kind in _BOUNDS:
        words, code = _BOUNDS[kind]
        bound = next(iter(ctx.values()), None)
        number = "integer" if isinstance(bound, int) else "decimal"
        return f"{name} must be {words} {_given(bound)}; got {_given(given)}", f"{number}_{code}_value"
    if kind == "finite_number":  # (NaN, Infinity: Python's json writes them, and pydantic reads them)
        return f"{name} must be a finite number; got {_given(given)}", "invalid_value"
    if kind in _TYPES:
        return f"{name} must be {_TYPES[kind]}; got {_given(given)}", "invalid_type"
    if kind in ("literal_error", "enum"):
        return (
            f"{name} must be {ctx.get('expected', 'one of its values')}; got {_given(given)}",
            "invalid_value",
        )
    if kind in ("too_short", "too_long") and ctx.get("field_type") == "List":
        if kind == "too_short":
            least = ctx.get("min_length")
            code = "empty_array" if not ctx.get("actual_length") else "array_below_min_length"
            return (
                f"{name} must have at least {least} item{'s' * (least != 1)}; got {ctx.get('actual_length')}",
                code,
            )
        return f"{name} takes at most {ctx.get('max_length')} items; got {ctx.get('actual_length')}", (
            "array_above_max_length"
        )
    if kind == "string_too_short":
        if given == "":
            return f"{name} is empty; give it some text", "empty_string"
        return f"{name} must have at least {ctx.get('min_length')} characters", "string_below_min_length"
    if kind == "string_too_long":
        return f"{name} takes at most {ctx.get('max_length')} characters; got {len(given)}", (
            "string_above_max_length"
        )
    message = str(err.get("msg", "invalid value"))
    return (f"{param}: {message}" if param else message), None


async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
    """A domain error (or ``APIError``) as its HTTP answer."""
    return error_response(as_api_error(exc))


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _wrong_body_kind(request: Request, errors: list[dict[str, Any]]) -> str | None:
    """What to say when the body is not of the kind the route reads: JSON sent to a route that takes a form
    (an upload), or a form (curl's ``-d`` without a content type) sent to one that takes JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body_params = getattr(getattr(request.scope.get("route"), "dependant", None), "body_params", [])
    if not body_params:
        return None
    if any(isinstance(p.field_info, params.Form) for p in body_params):  # ``File`` is a ``Form``
        if content_type in FORM_TYPES:
            return None
        given = content_type or "a body without a content type"
        return f"this endpoint takes a multipart/form-data upload (curl: -F name=value), not {given}"
    whole_body = any(tuple(e.get("loc", ())) == ("body",) for e in errors)
    if whole_body and content_type != "application/json":
        return "the body must be a JSON object, sent with Content-Type: application/json"
    return None


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400, naming the field."""
    wrong_kind = _wrong_body_kind(request, exc.errors())
    if wrong_kind:
        return error_response(APIError(400, wrong_kind))
    # Of a union's alternatives, the deepest error is the one closest to what the client meant.
    err = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={})
    param = None if err.get("type") == "json_invalid" else param_from_loc(tuple(err.get("loc", ())))
    multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
    message, code = _validation_answer(err, param, multipart)
    return error_response(APIError(400, message, param=param, code=code))


# OpenAI's paths that this server does not serve, and what to do instead: their 404 says it.
NOT_SERVED = {
    "/v1/audio/voice_consents": "this server keeps no consent recordings; create the voice from its clip "
    "with POST /v1/audio/voices (its consent field is accepted and ignored)",
}


# FastAPI's 400 for a body it could not read for any reason but malformed JSON (raised from the cause).
UNPARSED_BODY = "There was an error parsing the body"


def _unparsed_body(cause: BaseException | None) -> str:
    """Why a JSON body could not be read, from the cause of FastAPI's ``UNPARSED_BODY`` (a trial: invalid
    UTF-8, JSON nested 100,000 deep and a 5,000-digit number all got its words, which say nothing)."""
    if isinstance(cause, UnicodeDecodeError):
        return "the request body is not valid UTF-8; send JSON encoded as UTF-8"
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON here: it is nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "the request body holds a number too long to read (more than 4,300 digits)"
    return "the request body could not be read"


# Starlette's form parser's refusals, and what this API says instead (a hostile-input trial: its own words
# named no field and said nothing of what to do).
_FORM_FAULTS = [
    (re.compile(r"(?:Part|Field) exceeded maximum size of (\d+)KB\."),
     "a form field that is not a file is over {0} KB; send text fields shorter, and audio as a file part "
     "(with a filename)"),
    (re.compile(r"Too many fields\. Maximum number of fields is (\d+)\."),
     "the form has more than {0} fields; send the fields the endpoint takes"),
    (re.compile(r"Too many files\. Maximum number of files is (\d+)\."),
     "the form has more than {0} files; send the one file the endpoint takes"),
    (re.compile(r"Missing boundary in multipart\."),
     "the multipart/form-data Content-Type names no boundary; let the HTTP client write that header "
     "(curl -F, or a files= argument)"),
    (re.compile(r'The Content-Disposition header field "name" must be provided\.'),
     "a part of the form has no name in its Content-Disposition header; name every part"),
    (re.compile(r"Invalid multipart data\."),
     "the multipart/form-data body could not be read (a part's headers are malformed or too long)"),
]  # fmt: skip


def _form_fault(message: str) -> str | None:
    """This API's words for a refusal of Starlette's form parser; None for any other message."""
    for pattern, words in _FORM_FAULTS:
        if found := pattern.fullmatch(message):
            return words.format(*found.groups())
    return None


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in the envelope, with their headers (a 405's
    ``Allow``); an unknown route as OpenAI words it, and what to use instead for one of OpenAI's that this
    server does not serve."""
    message = str(exc.detail)
    if exc.status_code == 400 and message == UNPARSED_BODY:
        message = _unparsed_body(exc.__cause__)
    elif exc.status_code == 400:
        message = _form_fault(message) or message
    if exc.status_code == 404 and message == "Not Found":
        path = request.url.path.rstrip("/")
        message = f"Invalid URL ({request.method} {request.url.path})"
        if hint := next((h for p, h in NOT_SERVED.items() if path == p or path.startswith(p + "/")), None):
            message += f": {hint}"
    return error_response(APIError(exc.status_code, message, headers=dict(exc.headers or {})))


class ClientDisconnected(Exception):
    """The client closed its connection before the answer was ready (``routes.deps.until_disconnected``):
    answered 499, which nobody reads, so that it is logged and counted as such."""


async def on_client_gone(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=499)


class StreamCut(Exception):
    """A body that failed after its response began, raised on so that the server cuts it off (a client then
    sees an error, never a short answer that looks whole). Its request's line was logged already: nothing
    logs it again (it was two tracebacks, after the request's id was gone: an operator's trial)."""


class _QuietStreamCuts(logging.Filter):
    """Keeps the server's own "Exception in ASGI application" for a ``StreamCut`` out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamCut))


def quiet_stream_cuts() -> None:
    """Install ``_QuietStreamCuts`` on uvicorn's error logger, once."""
    server = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietStreamCuts) for f in server.filters):
        server.addFilter(_QuietStreamCuts())


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Anything else: a 500 that leaks nothing; the traceback goes to the log."""
    if not isinstance(exc, StreamCut):
        log.exception("unexpected failure")
    return error_response(as_api_error(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure in OpenAI's envelope."""
    for kind in DOMAIN_ERRORS:
        app.add_exception_handler(kind, on_domain_error)
    app.add_exception_handler(ClientDisconnected, on_client_gone)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
