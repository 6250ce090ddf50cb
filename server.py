"""How ``python app.py`` serves the app: uvicorn, with what a server facing real networks needs.

* **h11**, whose parser refuses a request head over 16 KB (400). uvicorn's default, httptools when it is
  installed (``uvicorn[standard]``, Ray Serve's dependencies), buffers a head of any size: one client
  sending an endless header took hundreds of MB and stalled every other request for seconds (a trial).
* **A deadline for a request's head** (``HEAD_SECONDS``), from the connection's start or the end of the
  previous answer: a client that sends its headers a byte at a time (slowloris) held its connection for
  ever. uvicorn's keep-alive timeout covers an idle connection only until its first byte.
* **The port bound before the models load**: uvicorn binds after the app's startup, so a port already
  in use was found after the engine had loaded (minutes with real weights); now it is one line and exit 3.

``uvicorn app:app`` does not get these; README "Security and limits" says what to give it instead.
"""

from __future__ import annotations

import asyncio
import logging
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
    socket = config.bind_socket()  # exits with uvicorn's one line when the port is taken
    uvicorn.Server(config).run(sockets=[socket])
