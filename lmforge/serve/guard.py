"""`GuardMiddleware`: what every request passes before it reaches a route, as plain ASGI.

In order: the API key (401, compared with `hmac.compare_digest` so timing says nothing about the key),
the body size (413, checked on Content-Length and again on the bytes actually received, since a chunked
body has no length), and the number of generation requests in flight (429; a streaming request counts
until its last byte is sent). Plain ASGI rather than a Starlette `BaseHTTPMiddleware` because the latter
buffers streaming responses and hides client disconnects from the route.
"""
from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass

from ..config import opt
from .protocol import error_body

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")


@dataclass
class ServeLimits:
    """Bounds that keep one client from exhausting the server."""

    max_body_bytes: int = opt(1 << 20, "largest request body in bytes (413 above it)")
    max_concurrent_requests: int = opt(64, "generation/embedding requests in flight at once (429 above it)")
    max_prompt_tokens: int | None = opt(None, "longest prompt in tokens (400 above it); null = the engine's "
                                              "max_model_len - 1")
    max_tokens: int | None = opt(None, "largest max_tokens a request may ask for (400 above it); null = "
                                       "max_model_len")
    max_n: int = opt(16, "largest n (samples per prompt) a request may ask for")
    max_prompts: int = opt(64, "largest number of prompts (or embedding inputs) in one request")
    drain_timeout: float = opt(60.0, "seconds shutdown waits for requests in flight to finish")


async def send_error(send, status: int, message: str, type: str, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(message, type, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """API key, body size and concurrency limits (see the module docstring)."""

    def __init__(self, app, api_key: str | None, limits: ServeLimits,
                 on_error: Callable[[int], None] | None = None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.limits = limits
        self.on_error = on_error
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._counting(send)
        path: str = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and path.startswith("/v1/") and not self._authorized(headers):
            return await send_error(send, 401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                    "authentication_error", "invalid_api_key",
                                    [(b"www-authenticate", b"Bearer")])
        limit = self.limits.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await send_error(send, 413, f"request body is {int(length)} bytes; the limit is {limit}",
                                    "invalid_request_error", "request_too_large")
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            try:
                receive = await self._buffered(receive, limit)
            except _BodyTooLarge:
                return await send_error(send, 413, f"request body is over the {limit}-byte limit",
                                        "invalid_request_error", "request_too_large")
        if path not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limits.max_concurrent_requests:
            return await send_error(send, 429, f"too many requests in flight (limit "
                                    f"{self.limits.max_concurrent_requests}); retry later",
                                    "rate_limit_error", "too_many_requests", [(b"retry-after", b"1")])
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            token = headers.get(b"x-api-key", b"")
        return hmac.compare_digest(token.strip(), self.api_key)

    def _counting(self, send):
        if self.on_error is None:
            return send

        async def wrapped(message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.on_error(message["status"])
            await send(message)
        return wrapped

    @staticmethod
    async def _buffered(receive, limit: int):
        """Read the whole body (refusing it past `limit`) and replay it; later receives (disconnects)
        go to the server's own `receive`."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                pending = [message]
                break
            size += len(message.get("body", b""))
            if size > limit:
                raise _BodyTooLarge
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                pending = []
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}, *pending]

        async def replayed():
            if replay:
                return replay.pop(0)
            return await receive()
        return replayed
