"""Graceful shutdown: on SIGTERM or SIGINT stop accepting, let running requests finish, then end the rest
with an OpenAI-style error, so that no client ever sees a cut body.

    SIGTERM -> uvicorn closes the listening socket and idle keep-alive connections
            -> running requests go on for up to --shutdown-timeout seconds
            -> those still running are aborted in the engine and answer a 503
               (a JSON error body; a stream gets an error event and `data: [DONE]`)
            -> the app's shutdown stops the engine core; the process exits

uvicorn's own timeout_graceful_shutdown cancels whatever still runs when it expires, which cuts a stream
mid-body and answers a text/plain 500; here it is only the last resort, END_GRACE_S after the drain, for a
handler that does not end when its requests are aborted.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from radixlm.server.serving import ServerContext

logger = logging.getLogger("radixlm.server")

DEFAULT_SHUTDOWN_TIMEOUT_S = 20.0  # under Kubernetes' default 30 s grace before SIGKILL
# After the drain: how long aborted requests get to send their error bodies before uvicorn cancels them.
END_GRACE_S = 5.0


def drain_message(timeout_s: float) -> str:
    return (
        f"the server is shutting down and this request did not finish within the {timeout_s:g} s it allows "
        "running requests (--shutdown-timeout); retry it on another server"
    )


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown drains the app's requests as described above."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext, shutdown_timeout_s: float) -> None:
        if not shutdown_timeout_s >= 0:
            raise ValueError(f"--shutdown-timeout must be >= 0, got {shutdown_timeout_s}")
        config.timeout_graceful_shutdown = shutdown_timeout_s + END_GRACE_S
        super().__init__(config)
        self.ctx = ctx
        self.shutdown_timeout_s = shutdown_timeout_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        running = len({rid for group in self.ctx.active.values() for rid in group})
        if running:
            logger.info(
                "shutting down: %d request(s) running get up to %g s to finish",
                running,
                self.shutdown_timeout_s,
            )
        deadline = asyncio.get_running_loop().call_later(self.shutdown_timeout_s, self._end_running)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _end_running(self) -> None:
        ended = self.ctx.end_all_requests(drain_message(self.shutdown_timeout_s))
        if ended:
            logger.warning("shutdown timeout: ending %d running request(s) with an error", ended)
