"""A real server and a real browser for the web page's tests and its screenshot.

``serve(app)`` (from ``live_server``) runs the app on uvicorn on a free loopback port in a thread;
``launch(playwright)`` starts Debian's headless Chromium (``/usr/bin/chromium``; Playwright never downloads
a browser here); ``Cable`` stands between the two, so that a test can cut every connection, as a server
that died or a network that failed would.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path
from urllib.parse import urlsplit

from live_server import serve

__all__ = ["CHROMIUM", "Cable", "launch", "serve"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # A fake microphone (a beeping tone) that needs no permission prompt, for the recording test.
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]


def launch(playwright):
    """Debian's Chromium, headless; fails (never skips) when it is not installed."""
    if not CHROMIUM.exists():
        raise RuntimeError(
            f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium chromium-driver)"
        )
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


class Cable:
    """A TCP relay on a free loopback port to the server at ``url``: ``cut()`` resets every connection through
    it (the browser sees a network error, mid-answer too), ``unplug()`` also stops taking new ones."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self._target = (parts.hostname, parts.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # unplugged
                return
            server = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:  # closed with a reset, not a clean end: an answer cut short must not look complete
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)  # at once, waking the relay's thread blocked on it
            except OSError:
                pass
            sock.close()

    def unplug(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; no new connection gets in
        except OSError:
            pass
        self._listener.close()
        self.cut()
