"""uvicorn's h11 protocol with a deadline for a request's headers, and JSON errors for bad heads.

uvicorn closes an idle keep-alive connection after --timeout-keep-alive, but it cancels that timer on
the first byte, and a new connection has none: a client that sends half a request head and stops holds
the connection (and a file descriptor) for ever. Here every connection must deliver a complete request
head within the timeout, counted from when it opened or from the end of its previous response.

The parsing stays h11's (uvicorn's own protocol class); only the timer is added.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from radixlm.server.errors import error_body

logger = logging.getLogger("radixlm.server")


class HeaderTimeoutH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a whole request head arrived and its cycle started
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        # Armed first: the parent may go straight on to a pipelined request, which disarms it.
        if not self.transport.is_closing():
            self._arm_header_timer()
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers a request head h11 cannot parse (malformed, or longer than --max-header-kb) with
        # text/plain; every error of this server is an OpenAI-style JSON body.
        body = json.dumps(
            error_body(400, f"invalid HTTP request: {msg} (or its headers exceed --max-header-kb)")
        )
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body.encode())):
            self.transport.write(self.conn.send(event))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            # No request has started, so there is nothing to answer (h11 sends a response only to a
            # request it has parsed): close.
            logger.info(
                "closing a connection that sent no complete request head in %gs", self.header_timeout_s
            )
            self.transport.close()


def header_timeout_protocol(timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class for uvicorn.Config(http=...), with this timeout."""
    return type(
        "HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": float(timeout_s)}
    )
