"""What one HTTP request may cost before any route sees it: body size, header size and count, and how long
its headers may take to arrive. Flags, the ASGI wrapper that enforces the first three, and uvicorn's
settings for the rest.

    --max-body-mb        413 above it: by Content-Length before reading, else while the body streams in
    --max-header-kb      total request-header bytes: 431 (400 from h11 when a head streams in past it)
    --max-headers        431 above it
    --header-timeout     a connection that has not sent a whole request head in time is closed

Errors are OpenAI-shaped like every other (server/errors.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixlm.server.errors import error_response
from radixlm.server.header_timeout import header_timeout_protocol

# A 10 MB prompt is a real use (a long document); 200 MB is not. The body is held in memory while parsed.
DEFAULT_MAX_BODY_MB = 32
# Browsers and proxies send a few KB; h11's own default is 16 KB.
DEFAULT_MAX_HEADER_KB = 64
DEFAULT_MAX_HEADERS = 100
DEFAULT_HEADER_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20
    max_header_bytes: int = DEFAULT_MAX_HEADER_KB << 10
    max_headers: int = DEFAULT_MAX_HEADERS
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_header_bytes", "max_headers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.header_timeout_s > 0:
            raise ValueError(f"header_timeout_s must be > 0, got {self.header_timeout_s!r}")

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config keywords: the h11 protocol with the header-size limit and the header timeout."""
        return {
            "http": header_timeout_protocol(self.header_timeout_s),
            "h11_max_incomplete_event_size": self.max_header_bytes,
        }


def add_limit_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--max-body-mb",
        type=float,
        default=DEFAULT_MAX_BODY_MB,
        help=f"Largest request body in MiB; larger is a 413 (default: {DEFAULT_MAX_BODY_MB}).",
    )
    group.add_argument(
        "--max-header-kb",
        type=int,
        default=DEFAULT_MAX_HEADER_KB,
        help=f"Largest request head (all headers) in KiB (default: {DEFAULT_MAX_HEADER_KB}).",
    )
    group.add_argument(
        "--max-headers",
        type=int,
        default=DEFAULT_MAX_HEADERS,
        help=f"Most headers one request may send; more is a 431 (default: {DEFAULT_MAX_HEADERS}).",
    )
    group.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT_S,
        help="Seconds a connection may take to send a request's headers before it is closed "
        f"(default: {DEFAULT_HEADER_TIMEOUT_S:g}).",
    )


def limits_from_args(ns: argparse.Namespace) -> RequestLimits:
    """The limits the flags ask for; a ValueError names a bad flag."""
    for flag, value in (
        ("--max-body-mb", ns.max_body_mb),
        ("--max-header-kb", ns.max_header_kb),
        ("--max-headers", ns.max_headers),
        ("--header-timeout", ns.header_timeout),
    ):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    return RequestLimits(
        max_body_bytes=max(int(ns.max_body_mb * (1 << 20)), 1),
        max_header_bytes=ns.max_header_kb << 10,
        max_headers=ns.max_headers,
        header_timeout_s=ns.header_timeout,
    )


class BodyTooLarge(HTTPException):
    """Raised from `receive` while a body streams in; an HTTPException, so FastAPI's body parsing passes
    it on (anything else it would turn into a 400) and the app's handler answers it."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the request body is larger than this server's limit of {_size(limit)} (--max-body-mb)"
        )


class LimitedApp:
    """The app behind the body-size and header-count limits."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if len(headers) > self.limits.max_headers:
            message = f"the request has {len(headers)} headers; this server allows {self.limits.max_headers} (--max-headers)"
            await error_response(431, message)(scope, receive, send)
            return
        # h11 enforces the size only while a head is still incomplete; one that arrived whole in a single
        # read is measured here.
        head_bytes = sum(len(name) + len(value) + 4 for name, value in headers)
        if head_bytes > self.limits.max_header_bytes:
            message = (
                f"the request headers take {head_bytes} bytes; this server allows "
                f"{self.limits.max_header_bytes} (--max-header-kb)"
            )
            await error_response(431, message)(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        declared = _content_length(headers)
        if declared is not None and declared > limit:
            await error_response(413, BodyTooLarge(limit).detail)(scope, receive, send)
            return
        await self.app(scope, _counting(receive, limit), send)


def _counting(receive: Receive, limit: int) -> Receive:
    """`receive` that raises BodyTooLarge once more than `limit` body bytes arrived (a chunked body, or a
    Content-Length that lies)."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return counted


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 already refuses a malformed one; nothing to decide here
    return None


def _size(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"
