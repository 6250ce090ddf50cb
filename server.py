"""How ``python app.py`` serves the app: uvicorn, with what a server facing real networks needs.

* **h11**, whose parser refuses a request head over 16 KB (400). uvicorn's default, httptools when it is
  installed (``uvicorn[standard]``, Ray Serve's dependencies), buffers a head of any size: one client
  sending an endless header took hundreds of MB and stalled every other request for seconds (a trial).
* **A deadline for a request's head** (``HEAD_SECONDS``), from the connection's start or the end of the
  previous answer: a client that sends its headers a byte at a time (slowloris) held its connection for
  ever. uvicorn's keep-alive timeout covers an idle connection only until its first byte.
* **The port bound before the models load**: uvicorn binds after the app's startup, so a port already
  in use was found after the engine had loaded (minutes with real weights). Now it is one line naming the
  address, the setting to change and why (``listen``), and exit 3 (uvicorn's code for a failed start);
  uvicorn's own line, ``[Errno 98] Address already in use``, named neither.

``uvicorn app:app`` does not get these; README "Security and limits" says what to give it instead.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from settings import Settings

log = logging.getLogger(__name__)

HEAD_SECONDS = 30.0
"""How long a request's head (request line and headers) may take to arrive."""


class Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose next request's head is late."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_due: asyncio.TimerHandle | None = None
        self._await_head()

    def _await_head(self) -> None:
        if self._head_due is not None:
            self._head_due.cancel()
        self._head_due = self.loop.call_later(HEAD_SECONDS, self._head_late)

    def _head_late(self) -> None:
        self._head_due = None
        if not self.transport.is_closing():
            log.info("closed a connection whose request headers took over %g s", HEAD_SECONDS)
            self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._head_due is not None:  # a request's head arrived
            self._head_due.cancel()
            self._head_due = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
            self._await_head()  # the next request's (uvicorn's keep-alive timeout ends an idle one sooner)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_due is not None:
            self._head_due.cancel()
            self._head_due = None
        super().connection_lost(exc)


STARTUP_FAILURE = 3
"""The exit code of a service that could not start listening (uvicorn's for a failed start)."""


def listen(settings: Settings) -> socket.socket:
    """A socket bound to the settings' host and port, listened on by uvicorn; exits with a line that names
    the address and what to change when it cannot be bound."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    address = (
        f"[{settings.host}]:{settings.port}"
        if family == socket.AF_INET6
        else f"{settings.host}:{settings.port}"
    )
    sock = None
    try:
        sock = socket.socket(family=family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        if sock is not None:
            sock.close()
        log.critical("cannot listen on %s: %s; %s", address, exc.strerror or exc, _remedy(exc))
        raise SystemExit(STARTUP_FAILURE) from None
    sock.set_inheritable(True)
    log.info("listening on http://%s", address)
    return sock


def _remedy(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "another process listens there: stop it, or choose another port with HIGGS_PORT"
    if exc.errno == errno.EACCES:
        return "ports below 1024 need privileges: choose another with HIGGS_PORT"
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return (
            "HIGGS_HOST is not an address of this machine: 127.0.0.1 serves this machine alone, 0.0.0.0 "
            "every network it is on"
        )
    return "check HIGGS_HOST and HIGGS_PORT"


def serve(app: Any, settings: Settings) -> None:
    """Serve ``app`` on the settings' host and port until a signal stops it (``shutdown.py``)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=Protocol,
        log_config=None,
        access_log=False,  # the request-id middleware logs each request, with its id
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
    )
    uvicorn.Server(config).run(sockets=[listen(settings)])
