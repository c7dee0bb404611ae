"""The HTTP server, end to end: a real server process started by its own CLI, driven by the official
`openai` client and raw httpx (DESIGN.md: how we test).

One server (module fixture, started with --api-key and --enable-metrics) serves every test but the
engine-death one, which kills its own server's core. Teardown sends SIGTERM and checks that the server
and its core process are gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from radixlm.testing import cached_model_folder

API_KEY = "test-key"
MODEL = "tiny-qwen"
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*extra: str) -> Server:
    model = cached_model_folder("qwen2", "tiny")
    args = ["--model-path", str(model), "--dtype", "float32", "--max-total-tokens", "20000", *extra]
    return launch(args)


def launch(args: list[str], *, wait: bool = True) -> Server:
    """`python -m radixlm.launch_server ARGS --port <free>`; with wait, returns once /health is 200."""
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="radixlm-server-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "radixlm.launch_server", *args, "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while wait and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    if wait:
        _stop(server)
        raise RuntimeError(f"the server did not become healthy in {START_TIMEOUT_S}s:\n{server.log_tail()}")
    return server


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _stop(server: Server, core_pid: int | None = None) -> tuple[bool, float]:
    """SIGTERM, then SIGKILL if it hangs. Returns (exited on SIGTERM alone, seconds taken)."""
    t0 = time.monotonic()
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(STOP_TIMEOUT_S)
        clean = True
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)
        clean = False
    if core_pid is not None:
        deadline = time.monotonic() + 10
        while _pid_alive(core_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(core_pid):
            os.kill(core_pid, signal.SIGKILL)
            clean = False
    return clean, time.monotonic() - t0


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # --strict-model-name: the 404 for another model name is tested here; the default (any name is
    # served) in test_dropin_compat.py.
    srv = _start("--api-key", API_KEY, "--served-model-name", MODEL, "--enable-metrics", "--strict-model-name")
    core_pid = _get(srv, "/get_model_info").json().get("core_pid")
    try:
        yield srv
    finally:
        clean, took = _stop(srv, core_pid)
    assert clean, f"SIGTERM did not shut the server down cleanly ({took:.1f}s):\n{srv.log_tail()}"
    assert srv.proc.returncode in (0, -signal.SIGTERM), srv.log_tail()


def _headers(key: str | None = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _get(srv: Server, path: str, **kw) -> httpx.Response:
    return httpx.get(srv.url + path, headers=_headers(), timeout=30, **kw)


def _post(srv: Server, path: str, body, **kw) -> httpx.Response:
    kw.setdefault("timeout", 60)
    return httpx.post(srv.url + path, json=body, headers=_headers(), **kw)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _sse(lines: Iterator[str]) -> list:
    """`data:` payloads of an SSE stream, [DONE] included as the string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _wait_idle(srv: Server, timeout: float = 15.0) -> dict:
    """Until no request runs and every used KV slot belongs to the prefix cache."""
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        info = _get(srv, "/get_server_info").json()
        if info["num_running"] == 0 and info["num_waiting"] == 0 and info["kv_used"] == info["cache_size"]:
            return info
        time.sleep(0.2)
    raise AssertionError(f"the server did not go idle: {info}")


# ---- OpenAI routes ----------------------------------------------------------------------------------
def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completions_prompt_forms(client: openai.OpenAI) -> None:
    one = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0)
    assert len(one.choices) == 1 and one.choices[0].finish_reason in ("length", "stop")
    assert one.usage.prompt_tokens > 0 and one.usage.completion_tokens <= 5
    assert one.usage.prompt_tokens_details.cached_tokens >= 0

    many = client.completions.create(
        model=MODEL, prompt=["Hello there", "Once upon"], max_tokens=5, temperature=0
    )
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == one.choices[0].text  # greedy: the same prompt gives the same text

    ids = client.completions.create(
        model=MODEL, prompt=[5, 6, 7], max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 4
    id_lists = client.completions.create(
        model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert id_lists.choices[0].text == ids.choices[0].text
    assert id_lists.usage.prompt_tokens == 5 and id_lists.usage.completion_tokens == 8

    # The same prompt again is served from the prefix cache, and usage says so.
    again = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_completion_echo_and_stream(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=6, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "Tell me" + plain.choices[0].text
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Tell me",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Say something"}]},
    ]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert full.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # max_completion_tokens is the newer spelling of max_tokens.
    newer = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=12, temperature=0
    )
    assert newer.choices[0].message.content == full.choices[0].message.content


def test_n_with_seed_is_reproducible(client: openai.OpenAI) -> None:
    def sample():
        r = client.completions.create(
            model=MODEL,
            prompt="Pick",
            max_tokens=8,
            temperature=1.0,
            n=3,
            seed=1234,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.text for c in r.choices]

    first = sample()
    assert sample() == first
    assert len(set(first)) > 1, "n samples should draw from distinct streams"

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Pick"}],
        max_tokens=6,
        n=3,
        seed=7,
        temperature=1.0,
    )
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_logprobs_greedy_top_is_chosen(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for tok in content:
        assert len(tok.top_logprobs) == 3
        assert tok.top_logprobs[0].token == tok.token
        assert tok.logprob == pytest.approx(tok.top_logprobs[0].logprob, abs=1e-4)
        assert tok.logprob <= 0 and all(
            a.logprob >= b.logprob for a, b in zip(tok.top_logprobs, tok.top_logprobs[1:])
        )
    assert "".join(t.token for t in content) == r.choices[0].message.content

    c = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        best = max(top, key=top.get)
        assert best == tok and top[best] == pytest.approx(value, abs=1e-4)


def test_stop_string_trims_and_finishes_with_stop(client: openai.OpenAI) -> None:
    base = client.completions.create(
        model=MODEL, prompt="The story", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].text
    candidates = [text[i : i + 2] for i in range(3, len(text) - 2)]
    stop = next((s for s in candidates if s.strip() and "\ufffd" not in s), None)
    assert stop, f"no usable stop string in {text!r}"
    r = client.completions.create(
        model=MODEL,
        prompt="The story",
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.find(stop)]
    assert stop not in r.choices[0].text
    streamed = client.completions.create(
        model=MODEL,
        prompt="The story",
        max_tokens=24,
        temperature=0,
        stop=stop,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---- native routes ----------------------------------------------------------------------------------
def test_generate_plain_and_stream(server: Server) -> None:
    body = {
        "text": "Once upon a time",
        "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
    }
    plain = _post(server, "/generate", body)
    assert plain.status_code == 200, plain.text
    out = plain.json()
    assert len(out["output_ids"]) == 6 and out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["meta_info"]["completion_tokens"] == 6

    with httpx.stream(
        "POST", server.url + "/generate", json={**body, "stream": True}, headers=_headers(), timeout=60
    ) as r:
        assert r.status_code == 200
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    # Each event is cumulative: the last one is the whole result.
    assert chunks[-1]["text"] == out["text"] and chunks[-1]["output_ids"] == out["output_ids"]
    assert [len(c["output_ids"]) for c in chunks] == sorted(len(c["output_ids"]) for c in chunks)

    batch = _post(
        server,
        "/generate",
        {"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": {"max_new_tokens": 3}, "return_logprob": True},
    ).json()
    assert isinstance(batch, list) and [b["index"] for b in batch] == [0, 1]
    assert all(len(b["meta_info"]["output_token_logprobs"]) == len(b["output_ids"]) for b in batch)


def test_info_health_and_cache_routes(server: Server) -> None:
    info = _get(server, "/get_model_info").json()
    assert info["model_impl"] in ("native", "transformers") and info["model_impl_reason"]
    assert info["served_model_name"] == MODEL
    sinfo = _get(server, "/get_server_info").json()
    for key in ("kv_capacity", "kv_used", "kv_usage", "cache_size", "num_running", "num_waiting"):
        assert key in sinfo
    assert _get(server, "/health_generate").status_code == 200
    _wait_idle(server)
    flushed = _post(server, "/flush_cache", {})
    assert flushed.status_code == 200 and flushed.json()["success"]
    assert _get(server, "/get_server_info").json()["cache_size"] == 0


def test_metrics(server: Server, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4, temperature=0)
    r = httpx.get(server.url + "/metrics", timeout=30)  # open to scrapers even with --api-key
    assert r.status_code == 200
    text = r.text
    for name in (
        "radixlm:num_running_reqs",
        "radixlm:num_queue_reqs",
        "radixlm:token_usage",
        "radixlm:cache_hit_rate",
        "radixlm:prompt_tokens_total",
        "radixlm:generation_tokens_total",
        "radixlm:time_to_first_token_seconds_bucket",
        "radixlm:inter_token_latency_seconds_bucket",
        "radixlm:e2e_request_latency_seconds_bucket",
    ):
        assert name in text, name
    ttft = [
        line for line in text.splitlines() if line.startswith("radixlm:time_to_first_token_seconds_count")
    ]
    assert ttft and float(ttft[0].split()[-1]) >= 1


def test_abort_request_by_rid(server: Server) -> None:
    async def run() -> dict:
        async with httpx.AsyncClient(base_url=server.url, headers=_headers(), timeout=60) as http:
            body = {
                "text": "long",
                "rid": "abort-me",
                "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
            }
            task = asyncio.create_task(http.post("/generate", json=body))
            for _ in range(100):  # until it runs
                await asyncio.sleep(0.1)
                if (await http.get("/get_server_info")).json()["num_running"]:
                    break
            r = await http.post("/abort_request", json={"rid": "abort-me"})
            assert r.status_code == 200
            return (await task).json()

    out = asyncio.run(run())
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(out["output_ids"]) < 3000
    _wait_idle(server)


# ---- errors -----------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("temperature-type", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400),
    ("max-tokens-negative", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400),
    ("max-tokens-float", "/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400),
    ("top-p-above-1", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400),
    ("n-zero", "/v1/completions", {"prompt": "x", "n": 0}, 400),
    ("empty-stop", "/v1/completions", {"prompt": "x", "stop": [""]}, 400),
    ("unknown-model", "/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404),
    (
        "unknown-model-chat",
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        404,
    ),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400),
    ("bad-role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400),
    (
        "image-part",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
    ),
    (
        "top-logprobs-without-logprobs",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
    ),
    ("prompt-longer-than-context", "/v1/completions", {"prompt": [1] * 5000, "max_tokens": 1}, 400),
    ("token-outside-vocab", "/v1/completions", {"prompt": [1, 10**6]}, 400),
    ("empty-prompt-list", "/v1/completions", {"prompt": []}, 400),
    # Unknown fields are rejected, as OpenAI does, rather than silently ignored (vLLM's choice).
    ("unknown-field", "/v1/completions", {"prompt": "x", "frobnicate": 1}, 400),
    ("logit-bias-out-of-range", "/v1/completions", {"prompt": "x", "logit_bias": {"5": 101.0}}, 400),
    ("generate-both-inputs", "/generate", {"text": "x", "input_ids": [1]}, 400),
    ("generate-unknown-sampling-key", "/generate", {"text": "x", "sampling_params": {"nope": 1}}, 400),
    ("generate-bad-top-k", "/generate", {"text": "x", "sampling_params": {"top_k": -5}}, 400),
    ("not-json", "/v1/completions", "{not json", 400),
]


@pytest.mark.parametrize(
    ("route", "body", "status"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests(server: Server, client: openai.OpenAI, route: str, body, status: int) -> None:
    if isinstance(body, str):
        r = httpx.post(
            server.url + route, content=body, headers={**_headers(), "Content-Type": "application/json"}
        )
    else:
        r = _post(server, route, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] and "code" in error and "param" in error
    # The server keeps serving.
    ok = client.completions.create(model=MODEL, prompt="still alive", max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL, prompt="x", top_p=2.0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_api_key_required(server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["message"]
    assert httpx.get(server.url + "/get_model_info", timeout=30).status_code == 401
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # probes need no key
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- load and disconnects ---------------------------------------------------------------------------
def test_256_concurrent_streams(server: Server) -> None:
    n_requests, max_tokens = 256, 8

    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[int, int, str | None]:
        stream = await aclient.completions.create(
            model=MODEL,
            prompt=f"request number {i}",
            max_tokens=max_tokens,
            temperature=0.8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks, usage, finish = 0, None, None
        async for chunk in stream:
            if chunk.choices:
                chunks += 1
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        return usage.completion_tokens, chunks, finish

    async def run() -> list:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=170)
        async with aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(n_requests)))

    results = asyncio.run(run())
    assert len(results) == n_requests
    assert all(tokens == max_tokens and finish == "length" for tokens, _, finish in results), results[:5]
    assert all(chunks >= 1 for _, chunks, _ in results)
    _wait_idle(server)


def test_dropped_stream_frees_kv(server: Server) -> None:
    body = {"prompt": "a long story", "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=_headers(), timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    # The connection is closed here, mid-stream.
    info = _wait_idle(server, timeout=15)
    assert info["kv_used"] == info["cache_size"]


def test_dropped_non_streaming_request_frees_kv(server: Server) -> None:
    body = {"prompt": "another long story", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        _post(server, "/v1/completions", body, timeout=1.5)
    _wait_idle(server, timeout=15)


# ---- engine death -----------------------------------------------------------------------------------
def test_engine_death_gives_503_fast() -> None:
    srv = _start("--max-running-requests", "16")
    core_pid = None
    try:
        core_pid = httpx.get(srv.url + "/get_server_info", timeout=30).json().get("core_pid")
        if core_pid is None:
            pytest.skip("the engine core runs inline (no core_pid): nothing to kill")

        async def kill_during_requests() -> tuple[httpx.Response, list, float]:
            long = {"prompt": "x", "max_tokens": 3000, "ignore_eos": True}
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
                plain = asyncio.create_task(http.post("/v1/completions", json=long))
                async with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as streamed:
                    lines = streamed.aiter_lines()
                    first = await anext(lines)  # the stream is running
                    os.kill(core_pid, signal.SIGKILL)
                    t0 = time.monotonic()
                    events = _sse([first] + [line async for line in lines])
                return await plain, events, time.monotonic() - t0

        in_flight, events, took = asyncio.run(kill_during_requests())
        # Requests that were running when the core died fail at once: 503, or an error event mid-stream.
        assert in_flight.status_code == 503, in_flight.text
        assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
        assert took < 5

        assert httpx.get(srv.url + "/health", timeout=5).status_code == 503
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503, r.text
        assert time.monotonic() - t0 < 5
        assert r.json()["error"]["message"]
    finally:
        clean, took = _stop(srv, core_pid)
    assert clean, f"the server did not exit on SIGTERM after its core died ({took:.1f}s):\n{srv.log_tail()}"
