"""OpenAI-style errors: every non-2xx answer is `{"error": {"message", "type", "param", "code"}}`.

The `openai` client reads `error.message` from this body, so a user sees our message, not a bare status.

    400 invalid_request_error   a bad value or type (pydantic, SamplingParams, the Engine's prompt checks)
    401 authentication_error    --api-key is set and the request lacks `Authorization: Bearer <key>`
    404 invalid_request_error   an unknown model name (code model_not_found) or route
    503 service_unavailable     the engine is not ready, or its core has died
    500 server_error            a bug: logged with its traceback
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("radixlm.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised anywhere under a route; the handler below turns it into the OpenAI error body."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


# Error text echoes the caller's input (a model name, a field name); 1 MB in must not be 1 MB out.
MAX_MESSAGE_CHARS = 2000
MAX_PARAM_CHARS = 200


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying so."""
    if len(text) <= limit:
        return text
    return text[: max(limit - 40, 0)] + f"... ({len(text) - limit + 40} more characters)"


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": clip(message, MAX_MESSAGE_CHARS),
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": None if param is None else clip(param, MAX_PARAM_CHARS),
            "code": code if code is not None else status,
        }
    }


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


# Our own pydantic error types, raised by model validators, that name their field in ctx["loc"].
_LOC_IN_CONTEXT = (
    "invalid_text",
    "empty_prompt",
    "unsupported_field",
    "conflicting_fields",
    "missing_content",
    "no_tools",
    "unknown_tool",
)


def validation_message(
    errors: list[dict[str, Any]], strip_prefix: tuple[str, ...] = ("body",)
) -> tuple[str, str | None]:
    """pydantic errors -> ("field.path: what is wrong; ...", "field.path" of the first)."""
    parts, first = [], None
    for err in errors[:3]:
        loc = [clip(str(x), 80) for x in err.get("loc", ()) if str(x) not in strip_prefix]
        if err.get("type") == "json_invalid":
            loc = []  # its loc is a character offset, not a field
        if err.get("type") in _LOC_IN_CONTEXT:
            loc += [str(err.get("ctx", {}).get("loc", ""))]  # found by a walk under the model's own loc
        where = ".".join(loc)
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # our own validators' text, without pydantic's "Value error, "
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field (this server rejects fields it does not implement rather than ignore them)"
        elif err.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {err.get('ctx', {}).get('error', msg)}"
        parts.append(f"{where}: {msg}" if where else msg)
        first = first if first is not None else (where or None)
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more")
    return "; ".join(parts), first


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 by default; OpenAI and vLLM answer 400, which is what clients expect.
        message, param = validation_message(list(exc.errors()))
        return error_response(400, message, param)

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors(include_url=False))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    # Not `exception_handler(Exception)`: Starlette runs that one outermost and re-raises after answering,
    # and uvicorn then closes the keep-alive connection, failing the client's next request on it.
    app.add_middleware(UnexpectedErrorMiddleware)


class UnexpectedErrorMiddleware:
    """A bug under a route answers an OpenAI-style 500 and the connection stays usable. Once a response
    has started (a stream), its body cannot be fixed: the error propagates and the connection closes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            response = error_response(500, f"internal server error: {type(exc).__name__}: {exc}")
            await response(scope, receive, send)
