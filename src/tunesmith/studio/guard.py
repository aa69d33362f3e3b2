"""Who may call the studio, checked in one place before any route runs and before a request's body is read.

`guard(app, studio, ...)` installs one ASGI middleware around the whole application (and OpenAI-shaped error bodies
with no traceback or path). Every path needs the key except the few public ones below (`PUBLIC`: the page's own
static files and /health, which carry nothing of the user's), so a router mounted on the same app later --
`app.include_router(...)`, `app.mount(...)`, any path at all -- is behind the key with nothing to add: auth is by
default, and making a route public means adding it to `PUBLIC` here, on purpose.

What one request goes through, in this order, from its headers alone:

  1. Host: on a loopback bind only a loopback Host is served (a web page cannot rebind a name to the port).
  2. The key, as Jupyter's token: `Authorization: Bearer KEY` (OpenAI's SDK), `X-API-Key: KEY`, or the cookie the page
     got by being opened once as `/?token=KEY` (answered with a redirect to `/` that sets the cookie, so the token
     leaves the address bar and the history). Compared in constant time. The studio makes the key when it starts
     (`HOME/.token`, mode 600, `tml-<random>`: the Tinker SDK's shape) unless `--api-key` names one; `--no-auth`
     (loopback only) turns this step off.
  3. Origin: a state-changing request (not GET/HEAD/OPTIONS) from a browser page whose `Origin` is not the studio's
     own, or that the browser marks `Sec-Fetch-Site: cross-site`/`same-site`, is refused; a request authenticated
     by the cookie is refused from any other origin, GET included (the cookie is also SameSite=Strict, HttpOnly).
  4. The body's size: a Content-Length past the path's limit is refused at once; a chunked body is counted as the
     application reads it and refused (413) the moment it passes the limit -- nothing is buffered here.

Own code rather than serve.py's `harden`, which knows nothing of cookies, origins or tokens; step 4 is serve.py's
`limit_body` (export is below studio in the import layers).
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import parse_qs, urlsplit

from tunesmith.export.serve import LOOPBACK_HOSTS, _host, add_error_handlers, limit_body, openai_error

log = logging.getLogger("tunesmith.studio")
TOKEN_FILE = ".token"
PUBLIC = ("/", "/health", "/favicon.ico")   # and /static/*: the page's own files, nothing of the user's
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def load_or_make_token(home: Path) -> str:
    """The studio's key: `HOME/.token` (mode 600) as it is, or a new `tml-<43 url-safe characters>` written there."""
    path = Path(home) / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if token:
            os.chmod(path, 0o600)
            return token
    except FileNotFoundError:
        pass
    token = "tml-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def cookie_name(port: int) -> str:
    return f"tunesmith-token-{port}"  # cookies ignore ports: one name per studio on this host


def guard(app, api_key: Optional[str], loopback_only_hosts: bool, body_limit: Callable[[str], int]) -> None:
    """Install the checks above (`api_key` None: no key, the --no-auth case) and OpenAI-shaped error bodies."""
    add_error_handlers(app, log)
    app.add_middleware(Guard, api_key=api_key, loopback_only_hosts=loopback_only_hosts, body_limit=body_limit)


class Guard:
    """The ASGI middleware of the module docstring."""

    def __init__(self, app, api_key: Optional[str], loopback_only_hosts: bool, body_limit: Callable[[str], int]):
        self.app, self.api_key, self.loopback_only, self.body_limit = app, api_key, loopback_only_hosts, body_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        refusal = self._refusal(scope, headers, path, method)
        if refusal is not None:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await refusal(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await limit_body(self.app, scope, receive, send, self.body_limit(path), headers)  # step 4, shared with serve

    def _refusal(self, scope, headers: dict, path: str, method: str):
        host = headers.get("host", "")
        if self.loopback_only and _host(host) not in LOOPBACK_HOSTS:
            return openai_error(400, "this server answers requests to a loopback address only")
        fetch_site = headers.get("sec-fetch-site", "")
        origin = headers.get("origin")
        foreign = (origin is not None and not _same_origin(origin, host)) or fetch_site in ("cross-site", "same-site")
        if method not in SAFE_METHODS and foreign:
            return openai_error(403, "a request from another web site's page is refused (its Origin is not this "
                                     "studio's)", code="cross_origin_refused")
        if self.api_key is None:
            return None
        if path == "/" and method == "GET" and "token" in (query := parse_qs(scope.get("query_string", b"").decode())):
            if not _equal(query["token"][0], self.api_key):
                return openai_error(401, "the token in the address is not this studio's key")
            return _set_cookie_and_redirect(cookie_name(scope["server"][1] if scope.get("server") else 0), self.api_key)
        if path in PUBLIC or path.startswith("/static/"):
            return None
        given = _bearer(headers.get("authorization", "")) or headers.get("x-api-key")
        if given is not None:
            return None if _equal(given, self.api_key) else _unauthorized()
        cookie = _cookie(headers.get("cookie", ""), cookie_name(scope["server"][1] if scope.get("server") else 0))
        if cookie is None or not _equal(cookie, self.api_key):
            return _unauthorized()
        if foreign or fetch_site not in ("", "same-origin", "none"):
            return openai_error(403, "the studio's cookie is accepted from its own page only", code="cross_origin_refused")
        return None


def _unauthorized():
    return openai_error(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY; the key is "
                             "printed by `tunesmith studio` and kept in its home's .token file)",
                        headers={"WWW-Authenticate": "Bearer"})


def _equal(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), key.encode())


def _bearer(header: str) -> Optional[str]:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _cookie(header: str, name: str) -> Optional[str]:
    jar = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # a malformed Cookie header is no cookie
        return None
    return jar[name].value if name in jar else None


def _same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()


def _set_cookie_and_redirect(name: str, token: str):
    from starlette.responses import RedirectResponse

    r = RedirectResponse("/", status_code=303)
    r.set_cookie(name, token, httponly=True, samesite="strict", path="/")
    return r

