"""``/docs`` and ``/redoc``: the API's schema as pages to try the API from, served whole by this server.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc's fonts from Google): offline they were
blank, and each visit told third parties about it. Here their files come from the ``fastapi-offline``
package, looked up by exact name, under ``/docs/assets/``.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from routes.deps import StaticFiles

TITLE = "Higgs Audio OpenAI-compatible server"
ASSETS_URL = "/docs/assets"
_FILES = StaticFiles(
    Path(fastapi_offline.__file__).resolve().parent / "static",
    {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png"},
    "the API's pages",
)

# Nothing from elsewhere, whatever the pages' scripts ask for (ReDoc's bundle shows its maker's logo from
# cdn.redoc.ly): their own inline script and styles, this server's files, and the worker ReDoc makes; and no
# other site may frame them (Swagger's Authorize button takes the API key: a security review).
_ONLY_HERE = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; worker-src 'self' blob:; "
    "font-src 'self' data:; frame-ancestors 'none'",
}

router = APIRouter(include_in_schema=False)


def _asset(request: Request, name: str) -> str:
    return f"{request.scope.get('root_path', '')}{ASSETS_URL}/{name}"


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI, to read the schema and try its endpoints."""
    root = request.scope.get("root_path", "")
    page = get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title=f"{TITLE}: Swagger UI",
        swagger_js_url=_asset(request, "swagger-ui-bundle.js"),
        swagger_css_url=_asset(request, "swagger-ui.css"),
        swagger_favicon_url=_asset(request, "favicon.png"),
        oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
    )
    page.headers.update(_ONLY_HERE)
    return page


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    page = get_swagger_ui_oauth2_redirect_html()
    page.headers.update(_ONLY_HERE)
    return page


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc, to read the schema, in the system's fonts."""
    page = get_redoc_html(
        openapi_url=f"{request.scope.get('root_path', '')}/openapi.json",
        title=f"{TITLE}: ReDoc",
        redoc_js_url=_asset(request, "redoc.standalone.js"),
        redoc_favicon_url=_asset(request, "favicon.png"),
        with_google_fonts=False,
    )
    page.headers.update(_ONLY_HERE)
    return page


@router.get(ASSETS_URL + "/{name}")
async def asset(name: str) -> FileResponse:
    """One of the pages' files."""
    return _FILES.response(name)
