"""Issue 10, hole 6: SIGTERM with long requests in flight. The server stops accepting, lets running
requests finish for --shutdown-timeout seconds, then ends the rest with an OpenAI-style error: a 503 JSON
body, or for a stream an error event and `data: [DONE]`. No client sees a cut body, and no process is
left behind. Before, streams were cut mid-body after uvicorn's 5 s and the others got a text/plain 500."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx

from tests.server.test_server import _pid_alive, _start

SHUTDOWN_TIMEOUT_S = 3
LONG = {"max_tokens": 4000, "ignore_eos": True}  # far longer than the drain window on any CPU
SHORT = {"max_tokens": 8, "ignore_eos": True}


def _events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _is_shutdown_error(error: dict) -> bool:
    return error["type"] == "service_unavailable" and "shutting down" in error["message"]


def test_sigterm_drains_then_ends_running_requests_with_errors() -> None:
    srv = _start("--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S))
    core_pid = httpx.get(srv.url + "/get_server_info", timeout=30).json().get("core_pid")
    chat = {"messages": [{"role": "user", "content": "tell me a story"}]}

    async def run() -> tuple[list, float]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:

            async def plain(path: str, body: dict) -> tuple[str, int, str]:
                r = await http.post(path, json=body)
                return "plain", r.status_code, r.text

            async def streamed(path: str, body: dict) -> tuple[str, int, str]:
                async with http.stream("POST", path, json={**body, "stream": True}) as r:
                    text = "".join([chunk async for chunk in r.aiter_text()])  # raises on a cut body
                return "stream", r.status_code, text

            tasks = [
                asyncio.create_task(plain("/v1/completions", {"prompt": "a", **LONG})),
                asyncio.create_task(streamed("/v1/completions", {"prompt": "b", **LONG})),
                asyncio.create_task(streamed("/v1/chat/completions", {**chat, **LONG})),
                asyncio.create_task(
                    plain(
                        "/generate",
                        {"text": "c", "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}},
                    )
                ),
            ]
            for _ in range(200):  # until all four run
                await asyncio.sleep(0.1)
                if (await http.get("/get_server_info")).json()["num_running"] >= 4:
                    break
            short = [
                asyncio.create_task(plain("/v1/completions", {"prompt": "d", **SHORT})),
                asyncio.create_task(streamed("/v1/chat/completions", {**chat, **SHORT})),
            ]
            await asyncio.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            results = await asyncio.gather(*tasks, *short)
            return results, time.monotonic() - t0

    try:
        results, took = asyncio.run(run())
        srv.proc.wait(SHUTDOWN_TIMEOUT_S + 30)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(10)
    log = srv.log_tail()
    long_results, short_results = results[:4], results[4:]
    # The long requests ran past the drain window and were ended with an OpenAI-style error.
    for kind, status, text in long_results:
        if kind == "plain":
            assert status == 503, text[:300]
            assert _is_shutdown_error(json.loads(text)["error"]), text[:300]
        else:
            assert status == 200, text[:300]
            events = _events(text)
            assert events[-1] == "[DONE]" and _is_shutdown_error(events[-2]["error"]), events[-3:]
    assert SHUTDOWN_TIMEOUT_S - 0.5 <= took < SHUTDOWN_TIMEOUT_S + 10, took
    # The short ones finished inside the window with their whole answer.
    (_, status, text), (_, stream_status, stream_text) = short_results
    assert status == 200 and json.loads(text)["choices"][0]["finish_reason"] == "length", text[:300]
    events = _events(stream_text)
    assert stream_status == 200 and events[-1] == "[DONE]", events[-3:]
    assert [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]] == ["length"]
    # A clean exit, and no process left behind.
    assert srv.proc.returncode in (0, -signal.SIGTERM), log  # uvicorn re-raises the signal it handled
    if core_pid is not None:
        deadline = time.monotonic() + 10
        while _pid_alive(core_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _pid_alive(core_pid), f"the core process {core_pid} outlived the server"
        if _pid_alive(core_pid):
            os.kill(core_pid, signal.SIGKILL)
