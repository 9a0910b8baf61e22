"""The web page: a static HTML page, one JavaScript module and a style sheet, shipped in
the package (``virtstore/web/static``) and served at ``/`` and ``/ui/...`` on every
listener. The page holds no data: it calls the REST API with the bearer token the user
logs in with, so the assets need no authentication themselves.

Every asset is sent with a strict Content-Security-Policy (scripts and styles from this
origin only, no inline script, no framing, no form posts), so an injected string cannot
run; the page builds its DOM with textContent, never with HTML strings.
"""

from __future__ import annotations

import functools
from importlib import resources

from virtstore.server.http import HTTPError, Request, Response

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def is_page(req: Request) -> bool:
    return req.method in ("GET", "HEAD") and (req.raw_path == "/" or
                                              req.segments[0] == "ui")


@functools.cache
def _asset(name: str) -> bytes | None:
    # A fixed set of names: nothing from the URL reaches a file path.
    if name not in ASSETS:
        return None
    return (resources.files("virtstore") / "web" / "static" / name).read_bytes()


ASSETS = ("index.html", "app.js", "app.css")


def serve(req: Request) -> Response:
    name = "index.html" if req.raw_path in ("/", "/ui", "/ui/") else "/".join(req.segments[1:])
    data = _asset(name)
    if data is None:
        raise HTTPError(404, "not-found", f"no such resource '{req.raw_path}'")
    ctype = _TYPES[name[name.rfind("."):]]
    return Response(200, data, ctype, list(HEADERS))
