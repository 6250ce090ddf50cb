"""A real server and a real browser for the web page's tests and its screenshot.

``serve(app)`` runs the app on uvicorn on a free loopback port in a thread; ``launch(playwright)`` starts
Debian's headless Chromium (``/usr/bin/chromium``; Playwright never downloads a browser here).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(app, startup_timeout: float = 120.0) -> Iterator[str]:
    """Run ``app`` on uvicorn on loopback in a thread; yields its base URL until the block ends."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def launch(playwright):
    """Debian's Chromium, headless; fails (never skips) when it is not installed."""
    if not CHROMIUM.exists():
        raise RuntimeError(
            f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium chromium-driver)"
        )
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
