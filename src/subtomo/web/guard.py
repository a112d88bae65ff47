"""ASGI middleware that enforces the rules of :mod:`subtomo.web.security` on every request."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from subtomo.web.security import TOKEN_COOKIE, host_name, is_loopback, token_matches


class AccessGuard:
    """ASGI middleware enforcing the token, Host and Origin rules above."""

    def __init__(self, app: ASGIApp, token: str | None, bound_host: str) -> None:
        self.app = app
        self.token = token
        self.loopback = is_loopback(bound_host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a request that breaks a rule; on the first visit with the token, set its cookie."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if self.token and request.query_params.get("token") == self.token:
            # the first visit carries the token in the URL: keep it in a cookie for the page's own requests
            async def send_with_cookie(message: Message) -> None:
                if message["type"] == "http.response.start":
                    cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                    message.setdefault("headers", []).append((b"set-cookie", cookie.encode()))
                await send(message)

            await self.app(scope, receive, send_with_cookie)
            return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> Response | None:
        if self.loopback and not is_loopback(host_name(request.headers.get("host") or "")):
            return PlainTextResponse("Forbidden: this GUI answers only on a loopback host name.", status_code=403)
        if self.token and not self._has_token(request):
            return PlainTextResponse("Forbidden: open the URL with ?token=... that `subtomo gui` printed.", status_code=403)
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
                return PlainTextResponse("Forbidden: cross-origin request.", status_code=403)
            if not (request.headers.get("content-type") or "").startswith("application/json"):
                return PlainTextResponse("Unsupported media type: send JSON.", status_code=415)
        return None

    def _has_token(self, request: Request) -> bool:
        assert self.token is not None
        given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("token "):
            given = given or header[6:]
        return token_matches(given, self.token)
