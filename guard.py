"""Access and size checks at the door, before any body is read: an ASGI middleware.

* A request head (request line and headers) over ``MAX_HEAD_BYTES`` is a 431, the connection closed. h11
  (``server.py``) refuses a longer head only while it is still arriving; one that came in a single read,
  up to about 100 KB in a trial, reached the app.
* With an API key configured, every path but the public ones (health, readiness, the web page's files)
  needs ``Authorization: Bearer <key>``, compared in constant time; otherwise 401 in OpenAI's envelope,
  before the body is read.
* A body is refused with 413 when its ``Content-Length`` is over the limit, or, for a body of unannounced
  length, as soon as the bytes received pass it; the app then sees the body as it arrived.
* A head that means two things is a 400, the connection closed: a header that may come once given twice
  (``Authorization``, ``Content-Type``, ...), or a body framed both by ``Content-Length`` and by
  ``Transfer-Encoding`` (``SINGLE_HEADERS``, ``_ambiguous_head``).
* A body sent compressed (``Content-Encoding`` other than ``identity``) is a 415 naming the header: a
  gzip body was a 400 "There was an error parsing the body", and a ``br`` one was read as plain JSON.
* A multipart form whose body never closes (no ``--boundary--``) is a 400: the form's parser dropped its
  last part unseen. So is one with a text field that is not text in the form's charset (UTF-8): the
  parser took its bytes as Latin-1 (``_undecodable_field``).
* A body whose bytes stop coming for ``BODY_IDLE_SECONDS`` is answered 408 (the connection closed): a
  client that hung mid-upload held its connection and the bytes it had sent for ever. A client gone
  before its body arrived is logged and counted as 499, as any request whose client left (FastAPI
  answered it 400, "There was an error parsing the body").
* An answer whose client stops reading it for ``SEND_IDLE_SECONDS`` is dropped and its connection closed
  (the generation stops): a stalled reader held its connection, and the answer queued for it in memory,
  for as long as it stayed connected (a trial: 17 minutes, 4 MB of socket buffer each).

A body too large is read and dropped (for ``DRAIN_SECONDS`` at most) before the 413 goes out, unless the
client waits for ``100 Continue`` before sending it: the 413 closes the connection, and closing it while
the client is still sending resets it, so the client saw a connection error, not the answer (the openai
Node SDK got "Connection error." for a 45 MB body, and sent it twice more). A 401 keeps the connection,
whose server reads past the rest of the body by itself.
"""

from __future__ import annotations

import asyncio
import codecs
import contextvars
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)

BODY_IDLE_SECONDS = 30.0
"""How long the next part of a request's body may be waited for."""
SEND_IDLE_SECONDS = 60.0
"""How long a client may leave a part of its answer unread (the server's socket buffer full)."""
DRAIN_SECONDS = 10.0
"""How long a body too large is read and dropped at most (on a slower upload, the answer goes out
then and the client may see the connection reset)."""
MAX_HEAD_BYTES = 16 * 1024
"""The largest request head taken, counted as it was sent (request line, headers, line ends): h11's limit."""
# The web page and its static files hold no data; the page asks for the key itself when the API answers 401.
# Nor do the API's description and the pages that show it (``/docs``'s Authorize button takes the key for
# the requests tried from it): with them behind the key, a browser could not open them at all.
PUBLIC_PATHS = frozenset(
    {"/health", "/ready", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
PUBLIC_PREFIXES = ("/web/", "/docs/assets/")


# Headers a request may carry once: with two, the layers between a client and this app may each read
# another (the key check read the last Authorization, a proxy may check the first; the body's checks and
# its parser read two Content-Types differently: an abuse trial).
SINGLE_HEADERS = ("authorization", "content-type", "content-length", "transfer-encoding", "content-encoding")


def _ambiguous_head(raw: list[tuple[bytes, bytes]]) -> str | None:
    """What makes a request's head mean two things, else None: a header that may come once given twice,
    or a body framed both by ``Content-Length`` and by ``Transfer-Encoding`` (RFC 9112, 6.3: a proxy that
    reads the length and this server, which reads the chunks, would split the bytes into requests
    differently)."""
    names = [name.decode("latin-1").lower() for name, _ in raw]
    for name in SINGLE_HEADERS:
        if (count := names.count(name)) > 1:
            return f"the request has {count} {name.title()} headers; send one"
    if "content-length" in names and "transfer-encoding" in names:
        return "the request has both Content-Length and Transfer-Encoding; send one of them"
    return None


def _head_bytes(scope: Scope) -> int:
    """The size of a request's head as it was sent: ``METHOD /path?query HTTP/1.1``, each ``name: value``,
    and the line ends."""
    path = len(scope.get("raw_path") or scope.get("path", "").encode()) - len(scope.get("root_path", ""))
    query = scope.get("query_string", b"")
    line = len(scope.get("method", "")) + path + len(query) + bool(query) + 12  # ("?", spaces, version, CRLF)
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", [])) + 2


async def send_error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    **headers: str,
) -> None:
    """Answer with OpenAI's error envelope."""
    body = json.dumps(error_body(message, type_, param, code), separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


_DROPPED: contextvars.ContextVar[bool] = contextvars.ContextVar("answer_dropped", default=False)


class _DroppedAnswer(logging.Filter):
    """Leaves out uvicorn's error for an answer the gate left unfinished on purpose (its client stopped
    reading it: the gate's warning says so). uvicorn logs it in the request's own task, after the app
    returned, where ``_DROPPED`` is still set."""

    def filter(self, record: logging.LogRecord) -> bool:
        unfinished = record.getMessage().startswith("ASGI callable returned without completing")
        return not (unfinished and _DROPPED.get())


_DROPPED_ANSWER = _DroppedAnswer()


class RequestGate:
    """The API-key and body-size checks (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int):
        logging.getLogger("uvicorn.error").addFilter(_DROPPED_ANSWER)  # (once: the same filter)
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _head_bytes(scope) > MAX_HEAD_BYTES:
            await send_error(
                send, 431, f"the request's headers are larger than {MAX_HEAD_BYTES // 1024} KB",
                "invalid_request_error", "request_header_too_large", connection="close",
            )  # fmt: skip
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if fault := _ambiguous_head(scope.get("headers", [])):
            await _drain(receive, headers)
            await send_error(
                send, 400, fault, "invalid_request_error", "ambiguous_request", connection="close"
            )
            return
        if (
            self.api_key is not None
            and scope.get("path") not in PUBLIC_PATHS
            and not scope.get("path", "").startswith(PUBLIC_PREFIXES)
            and scope.get("method") != "OPTIONS"
        ):
            given = headers.get("authorization", "")
            token = given[7:].strip().encode() if given[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, self.api_key):
                what = "no API key was given" if not given else "the API key is not valid"
                await send_error(
                    send, 401, f"{what}; send Authorization: Bearer <key>", "authentication_error",
                    "invalid_api_key", www_authenticate="Bearer",
                )  # fmt: skip
                return
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            await send_error(
                send, 415, f"request bodies are taken uncompressed; send this one without Content-Encoding: "
                f"{encoding}", "invalid_request_error", "unsupported_content_encoding", connection="close",
            )  # fmt: skip
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _drain(receive, headers)
            await self._too_large(send)
            return
        await self._with_counted_body(scope, receive, send, headers)

    async def _too_large(self, send: Send) -> None:
        limit = self.max_body / (1024 * 1024)
        await send_error(send, 413, f"the request body is larger than {limit:.3g} MB",
                         "invalid_request_error", "request_too_large", connection="close")  # fmt: skip

    async def _with_counted_body(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        # The body is read here, up to the limit, so that a 413 can still be answered before the app starts.
        chunks: list[Message] = []
        received = 0
        while True:
            try:
                async with asyncio.timeout(BODY_IDLE_SECONDS):
                    message = await receive()
            except TimeoutError:
                await send_error(send, 408, f"the request body stopped arriving for {BODY_IDLE_SECONDS:g} s",
                                 "invalid_request_error", "request_timeout", connection="close")  # fmt: skip
                return
            if message["type"] == "http.disconnect":
                await send_error(send, 499, "the client closed the connection before its body arrived",
                                 "invalid_request_error", "client_closed_request")  # fmt: skip
                return
            if message["type"] != "http.request":
                chunks.append(message)
                break
            received += len(message.get("body", b""))
            if received > self.max_body:
                if message.get("more_body", False):
                    await _drain(receive, headers)
                await self._too_large(send)
                return
            chunks.append(message)
            if not message.get("more_body", False):
                break

        if (boundary := _unclosed_multipart(headers.get("content-type", ""), chunks)) is not None:
            await send_error(
                send, 400, f"the multipart body ends before its closing boundary (--{boundary}--), so its "
                "last part may be cut short; send the whole form", "invalid_request_error", None,
            )  # fmt: skip
            return

        if fault := _undecodable_field(headers.get("content-type", ""), chunks):
            name, message = fault
            await send_error(send, 400, message, "invalid_request_error", "invalid_value", name)
            return

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        async def send_or_give_up(message: Message) -> None:
            try:
                async with asyncio.timeout(SEND_IDLE_SECONDS):
                    await send(message)
            except TimeoutError:
                raise _StoppedReading from None

        try:
            await self.app(scope, replay, send_or_give_up)
        except _StoppedReading:
            # Returning with the answer unfinished makes the server close the connection: the client sees
            # a cut body, never a whole one (and uvicorn's error for it is left out: ``_DroppedAnswer``).
            _DROPPED.set(True)
            log.warning("the client read nothing of its answer for %g s: dropped", SEND_IDLE_SECONDS)


def _unclosed_multipart(content_type: str, chunks: list[Message]) -> str | None:
    """The boundary of a multipart form whose body never closes it (``--boundary--``), else None. The form's
    parser drops the last part of such a body without a word (a form ending in ``language`` was served as
    if none had been sent). The header is read by that parser's own function."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if kind != b"multipart/form-data" or not boundary:
        return None  # (no boundary: the parser's own 400)
    close = b"--" + boundary + b"--"
    seam = len(close) - 1  # a closing line split between two chunks: its start ends the last one
    tail = b""
    for message in chunks:
        body = message.get("body", b"")
        if close in body or close in tail + body[:seam]:
            return None
        tail = (tail + body[-seam:])[-seam:]
    return boundary.decode("latin-1")


def _undecodable_field(content_type: str, chunks: list[Message]) -> tuple[str, str] | None:
    """The name of a multipart form's first text field (a part without a filename) whose bytes are not text
    in the form's charset (UTF-8 unless its Content-Type names another), and what to tell the client; else
    None. The form's parser takes such bytes as Latin-1 without a word: a trial's transcript in GBK was
    stored as "ÎÒÃÇÐèÒª..." with a 200. Files are not read here; a text part over the parser's own limit
    is left to its 400."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if kind != b"multipart/form-data" or not boundary:
        return None
    try:
        charset = codecs.lookup(options.get(b"charset", b"utf-8").decode("latin-1")).name
    except LookupError:
        return None  # (the parser takes every field as Latin-1 then: nothing to tell apart)
    part: dict[str, Any] = {}
    header: list[bytes] = [b"", b""]
    faults: list[tuple[str, str]] = []

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        part["headers"][header[0].strip().lower()] = header[1].strip()
        header[:] = [b"", b""]

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        part["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        part["text"] = b"filename" not in disposition

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part["text"] and len(part["data"]) <= _TEXT_PART_BYTES:
            part["data"] += data[start:end]

    def on_part_end() -> None:
        if faults or not part["text"] or len(part["data"]) > _TEXT_PART_BYTES:
            return
        try:
            bytes(part["data"]).decode(charset)
        except UnicodeDecodeError as exc:
            what = "UTF-8" if charset == "utf-8" else f"{charset} (the form's charset)"
            byte = f"byte {exc.start} is {exc.object[exc.start]:#04x}"
            faults.append((part["name"], f"the form field {part['name']!r} is not {what} text ({byte}); send "
                           f"text fields encoded as {what}"))  # fmt: skip

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field,
            "on_header_value": on_header_value, "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )  # fmt: skip
    try:
        for message in chunks:
            parser.write(message.get("body", b""))
            if faults:
                break
    except Exception:  # (a malformed body: the form's parser says so in its own 400)
        return None
    return faults[0] if faults else None


# A text field the form's parser takes at most (Starlette's ``max_part_size``): past it, its own 400.
_TEXT_PART_BYTES = 1024 * 1024


class _StoppedReading(Exception):
    """The client left a part of its answer unread for ``SEND_IDLE_SECONDS``."""


async def _drain(receive: Receive, headers: dict[str, str]) -> None:
    """Read and drop the rest of a body too large, for ``DRAIN_SECONDS`` at most; nothing when the
    client waits for ``100 Continue`` (it has sent no body, and asking for more would make it send it)."""
    if headers.get("expect", "").lower() == "100-continue":
        return
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
    except TimeoutError:
        return
