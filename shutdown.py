"""A graceful stop: on SIGTERM (or a first Ctrl+C) running answers get the shutdown timeout to finish, and
those still running near its end are ended by the server, with an error the client can read.

uvicorn stops taking connections at the signal and waits ``timeout_graceful_shutdown`` seconds for the
open ones; then it cancels what is left, which cuts streams off mid-body (no SSE ``error`` event, an
incomplete chunked body) and leaves a non-streamed request without any answer. So, ``DRAIN_MARGIN_SECONDS``
before that, the engine is closed: every running or waiting generation fails with ``EngineFailure``
("the server is shutting down", ``engine_closed``), which an SSE stream ends with as an ``error`` event and a
non-streamed request answers as a 503 with ``Retry-After``; recognitions running or waiting end the same way
(``AsyncTranscriber.end_running``). Readiness answers 503 from the signal on.

The signal handlers are uvicorn's, wrapped (uvicorn installs them before the app starts, with
``signal.signal``, and restores its own saved ones when it stops). Only in the main thread, where signals
are delivered, and only over a handler that is a function (uvicorn's): under a test client or Ray Serve
nothing is installed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# What a request the shutdown ended is told (a generation's, a recognition's: 503 or an error event).
SHUTTING_DOWN = "the server is shutting down; send the request again"
# How long before the shutdown timeout runs out the server ends the answers still running, so that their
# error events and 503s are sent before uvicorn cancels the requests (at most half the timeout).
DRAIN_MARGIN_SECONDS = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drain:
    """Wraps the server's SIGTERM/SIGINT handlers while the app runs (``install``, ``uninstall``)."""

    def __init__(self, state: Any, timeout: float, stop_engine: Callable[[], None]):
        self.state = state
        self.timeout = timeout
        self.stop_engine = stop_engine
        self.began = False
        self._installed: list[tuple[signal.Signals, Any, Callable]] = []  # (signal, theirs, ours)
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ends_answers_after(self) -> float:
        """Seconds from the signal to the end of the answers still running."""
        return self.timeout - min(DRAIN_MARGIN_SECONDS, self.timeout / 2)

    def install(self) -> bool:
        """Wrap the handlers of ``SIGNALS`` (called in the app's startup); False when nothing was."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if not callable(previous) or previous is signal.default_int_handler:
                continue

            def handler(signum: int, frame: Any, previous: Callable = previous) -> None:
                self._loop.call_soon_threadsafe(self.begin)
                previous(signum, frame)

            signal.signal(sig, handler)
            self._installed.append((sig, previous, handler))
        return bool(self._installed)

    def begin(self) -> None:
        """The signal came (on the event loop): not ready any more; end the answers before the timeout."""
        if self.began:
            return
        self.began = True
        self.state.ready = False
        self.state.shutting_down = True
        log.info("shutting down: running answers have %.1f s to finish", self.ends_answers_after)
        self._timer = self._loop.call_later(self.ends_answers_after, self._end_answers)

    def _end_answers(self) -> None:
        log.warning("shutting down: ending the answers still running, with an error for their clients")
        self._loop.run_in_executor(None, self.stop_engine)

    def uninstall(self) -> None:
        """Put back the handlers that were wrapped (unless something replaced ours since), stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
        for sig, previous, ours in self._installed:
            if signal.getsignal(sig) is ours:
                signal.signal(sig, previous)
        self._installed.clear()
