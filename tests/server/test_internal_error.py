"""Issue 10, hole 5: a bug under a route answers an OpenAI-style 500 and leaves the keep-alive connection
usable. Before, Starlette re-raised after answering and uvicorn closed the connection, so a client's next
request on it failed. A real uvicorn server on a thread, over a stub Engine that raises."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from radixlm.server.app import create_app


class BrokenEngine:
    """is_alive, yet every generate call fails: an internal error, not a dead core."""

    model_info = {"model_path": "stub", "context_length": 64}

    def is_alive(self) -> bool:
        return True

    async def async_generate(self, **_: Any):
        raise RuntimeError("a bug in the engine")


@pytest.fixture
def port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(create_app(BrokenEngine(), shutdown_engine=False), log_level="critical")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_a_500_keeps_the_connection_alive(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    for attempt in range(3):
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        payload = json.loads(r.read())
        assert r.status == 500, payload
        assert r.getheader("content-type").startswith("application/json")
        assert (
            payload["error"]["type"] == "server_error"
            and "a bug in the engine" in payload["error"]["message"]
        )
        assert r.getheader("connection", "").lower() != "close"
        time.sleep(0.2)  # long enough for a server-side close to have happened
        # The same socket serves the next request (http.client raises if the server closed it).
        conn.request("GET", "/health")
        health = conn.getresponse()
        health.read()
        assert health.status == 200, attempt
    conn.close()
