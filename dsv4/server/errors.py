"""Errors in OpenAI's shape, and the two guards in front of every route: API key and body size.

Every failure a client can cause becomes `{"error": {"message", "type", "param", "code"}}` with a 4xx
status; only a fault of the server itself is a 5xx. The guards are plain ASGI middleware so they run
before the body is read or parsed: a wrong key is a 401 even for a malformed body, and an oversized
body is refused (413) from its Content-Length or as soon as its streamed bytes pass the limit.
It knows nothing of generation.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("dsv4.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class APIError(Exception):
    """A request the server answers with an error status (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|[a-z]+\[.*\]|[A-Z]\w*|function-\w+.*)$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = []
    for part in first.get("loc", ())[1:]:  # after "body"; stop at a union member's tag ("str", "list[int]")
        if isinstance(part, str) and _TYPE_TAG.match(part):
            break
        loc.append(str(part))
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"the body is not valid JSON: {ctx.get('error', first.get('msg'))}", None
    param = ".".join(loc) or None
    where = f" at '{param}'" if param else ""
    got = first.get("input")
    shown = json.dumps(got, default=str)[:80] if got is not None and not isinstance(got, dict) else None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    seen = f"; got {shown}" if shown is not None else ""
    return f"invalid request{where}: {first.get('msg')}{seen}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception to an OpenAI-shaped response."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        messages = {404: f"no route {request.url.path}; see /docs for the API",
                    405: f"{request.method} is not allowed on {request.url.path}"}  # fmt: skip
        message = messages.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}").response()


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the server's limit of {limit} bytes")


async def _send_error(send, exc: APIError) -> None:
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: the API key on /v1 routes (Bearer), and the body-size limit on all of them."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope.get("path", "").startswith("/v1"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                key.strip().encode(), self.api_key.encode()
            ):
                what = "missing" if not auth else "incorrect"
                return await _send_error(send, APIError(
                    401, f"API key {what}: send 'Authorization: Bearer <key>' with the server's --api-key",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))  # fmt: skip
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _send_error(send, APIError(400, f"bad Content-Length header {length!r}"))
            if n > self.max_body_bytes:
                return await _send_error(send, APIError(413, str(_BodyTooLarge(self.max_body_bytes).detail),
                                                        code="body_too_large"))  # fmt: skip
        return await self.app(scope, self._limited(receive), send)

    def _limited(self, receive):
        seen = 0
        limit = self.max_body_bytes

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        return receive_limited
