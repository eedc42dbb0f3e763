"""GET / : the web page (app/static, plain HTML/JS/CSS shipped inside the package, no build step).

The page talks to the public /v1 API only, exactly as any client does (with the API key the person
types in), so these routes need no key and know nothing about models.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from app.visuals import COLORMAPS_FILE

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# The only files served: a fixed table, so no request path ever reaches the file system.
ASSETS: dict[str, tuple[Path, str]] = {
    "app.js": (STATIC_DIR / "app.js", "text/javascript; charset=utf-8"),
    "style.css": (STATIC_DIR / "style.css", "text/css; charset=utf-8"),
    # the colour map the server's PNGs use, so the page draws heatmaps in exactly the same colours
    "colormaps.json": (COLORMAPS_FILE, "application/json"),
}

# The page loads its own script and style only; images come back from the API as blobs.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag) so a new server version's page is seen at once
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    """The page itself."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/static/{name}")
def asset(name: str) -> FileResponse:
    """One of the page's files, by name."""
    if name not in ASSETS:
        raise HTTPException(status_code=404)
    path, media_type = ASSETS[name]
    return FileResponse(
        path, media_type=media_type, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    )
