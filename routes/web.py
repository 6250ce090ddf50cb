"""The web page: ``/`` and its static files under ``/web/``.

The page is plain HTML, CSS and JavaScript modules from the ``web/`` folder (no build step); it calls the
same OpenAI-shaped API as any client. Its files are public (see ``guard.py``); the API behind it is not.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from routes.deps import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# Revalidated on each load, so a new version of the page is never mixed with cached old modules.
_FILES = StaticFiles(
    WEB_DIR,
    {
        ".html": "text/html; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".svg": "image/svg+xml",
    },
    "the web page",
    headers={"Cache-Control": "no-cache"},
)
# The page runs its own modules and styles only, talks to this server only, and plays what it fetched or
# recorded (blob: URLs): a voice's name or transcript that slipped past ``textContent`` could run nothing.
_ONLY_ITSELF = {
    "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; img-src 'self' data: blob:; "
    "connect-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
}

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The page."""
    page = _FILES.response("index.html")
    page.headers.update(_ONLY_ITSELF)
    return page


@router.get("/web/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    """One of the page's static files."""
    return _FILES.response(name)
