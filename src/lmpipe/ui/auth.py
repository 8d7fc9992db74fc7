"""The optional access token: with ``token`` set, every request must carry it."""

from __future__ import annotations

import secrets

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "lmpipe_token"


class TokenGate:
    """ASGI middleware: a request passes with the token in an ``Authorization: Bearer``
    header or the ``lmpipe_token`` cookie. A page opened as ``/?token=...`` sets the
    cookie (HttpOnly, SameSite=Strict) and is redirected to its URL without the token, so
    the token is neither kept in the history nor sent to anyone else."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.token = token.encode()

    def _valid(self, given: str | None) -> bool:
        return bool(given) and secrets.compare_digest(given.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        bearer = request.headers.get("authorization", "")
        if (bearer.startswith("Bearer ") and self._valid(bearer[7:].strip())) or self._valid(
            request.cookies.get(COOKIE)
        ):
            await self.app(scope, receive, send)
            return
        if self._valid(request.query_params.get("token")):
            query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            response = RedirectResponse(URL(str(request.url)).replace_query_params(**dict(query)))
            response.set_cookie(COOKIE, self.token.decode(), httponly=True, samesite="strict")
        elif request.url.path.startswith("/api/"):
            response = JSONResponse({"detail": "an access token is needed"}, status_code=401)
        else:
            response = PlainTextResponse(
                "lmpipe.ui: open this page with ?token=<the token the server was given>",
                status_code=401,
            )
        await response(scope, receive, send)
