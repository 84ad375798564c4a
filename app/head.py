"""HEAD requests on the API's GET routes, which FastAPI answers with 405."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HEAD_AS_GET", "HeadAsGet"]

#: Scope key of a HEAD request `HeadAsGet` routes as a GET.
HEAD_AS_GET = "alsub.head"


class HeadAsGet:
    """HEAD on every GET route, as HTTP asks (a client checking a product or a job
    without its body; FastAPI routes answered 405): routed and answered as a GET, its
    headers (Content-Length included) sent and its body not. The GET's work is done, but
    for product files (`HEAD_AS_GET` in the scope: not read)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET", HEAD_AS_GET: True}, receive, headers_only)
