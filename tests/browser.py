"""A real server and a real browser for the web page's tests and its screenshot.

``serve(app)`` (from ``live_server``) runs the app on uvicorn on a free loopback port in a thread;
``launch(playwright)`` starts Debian's headless Chromium (``/usr/bin/chromium``; Playwright never downloads
a browser here).
"""

from __future__ import annotations

from pathlib import Path

from live_server import serve

__all__ = ["CHROMIUM", "launch", "serve"]

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
