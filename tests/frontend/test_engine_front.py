"""The Engine's front against a real (tiny, inline) core: stream_interval, n > 1 as one AddRequest, the
KV-capacity prompt check, and what get_server_info reports."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from radixlm import Engine
from radixlm.messages import AddRequest
from radixlm.server.app import create_app
from radixlm.testing import cached_model_folder

KV_TOKENS = 512
GREEDY = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def llm():
    with Engine(
        model_path=str(cached_model_folder("qwen2")),
        dtype="float32",
        max_total_tokens=KV_TOKENS,
        stream_interval=3,
        inline_core=True,
        log_level="warning",
    ) as engine:
        yield engine


@pytest.fixture
def sent(llm, monkeypatch) -> list:
    """Every message the front sends to the core, in order."""
    messages: list = []
    real_send = llm._client.send

    def recording_send(msg):
        messages.append(msg)
        real_send(msg)

    monkeypatch.setattr(llm._client, "send", recording_send)
    return messages


def test_stream_interval_sends_a_chunk_every_n_tokens(llm) -> None:
    full = llm.generate(prompt="Once upon a time", sampling_params=GREEDY)
    chunks = list(llm.generate(prompt="Once upon a time", sampling_params=GREEDY, stream=True))
    assert [len(c["output_ids"]) for c in chunks] == [3, 3, 3, 1]  # every 3 tokens, and at the finish
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert sum((c["output_ids"] for c in chunks), []) == full["output_ids"]
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == [3, 6, 9, 10]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_stream_interval_with_logprobs_and_several_prompts(llm) -> None:
    async def main():
        gen = await llm.async_generate(
            prompt=["Hello", "The weather"],
            sampling_params=[{**GREEDY, "max_new_tokens": 7}, {**GREEDY, "max_new_tokens": 4}],
            stream=True,
            return_logprob=True,
        )
        return [c async for c in gen]

    chunks = asyncio.run(main())
    by_index = {0: [], 1: []}
    for c in chunks:
        by_index[c["index"]].append(c)
    assert [len(c["output_ids"]) for c in by_index[0]] == [3, 3, 1]
    assert [len(c["output_ids"]) for c in by_index[1]] == [3, 1]
    for cs in by_index.values():
        last = cs[-1]["meta_info"]
        assert len(last["output_token_logprobs"]) == last["completion_tokens"]
        assert [lp[1] for lp in last["output_token_logprobs"]] == sum((c["output_ids"] for c in cs), [])


def test_n_samples_are_one_add_request_per_prompt(llm, sent) -> None:
    params = {"max_new_tokens": 6, "temperature": 1.0, "n": 3, "seed": 11, "ignore_eos": True}
    a = llm.generate(prompt="Pick a word", sampling_params=params)
    adds = [m for m in sent if isinstance(m, AddRequest)]
    assert len(adds) == 1 and len(adds[0].rids) == 3
    assert [o["meta_info"]["id"] for o in a] == adds[0].rids
    assert adds[0].sampling_params["seed"] == 11  # the core derives seed + k; the front does not

    sent.clear()
    two = llm.generate(
        prompt=["Pick a word", "Another"], sampling_params={**params, "n": 2}, rid=["a0", "a1", "b0", "b1"]
    )
    adds = [m for m in sent if isinstance(m, AddRequest)]
    assert [m.rids for m in adds] == [["a0", "a1"], ["b0", "b1"]]  # prompt-major, as the user named them
    assert [o["meta_info"]["id"] for o in two] == ["a0", "a1", "b0", "b1"]
    assert [o["index"] for o in two] == [0, 0, 1, 1]

    # Seeds reproduce, samples differ, and sample k is what seed + k gives alone.
    b = llm.generate(prompt="Pick a word", sampling_params=params)
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
    assert len({tuple(o["output_ids"]) for o in a}) > 1
    for k in range(3):
        alone = llm.generate(prompt="Pick a word", sampling_params={**params, "n": 1, "seed": 11 + k})
        assert alone["output_ids"] == a[k]["output_ids"]


def test_prompt_beyond_the_kv_pool_is_a_value_error_at_the_front(llm, sent) -> None:
    capacity = llm.model_info["kv_capacity"]
    # The model's 4096 are clamped to the pool, so no request can outgrow it (issue 10, hole 7).
    assert capacity == llm.model_info["context_length"] == KV_TOKENS
    with pytest.raises(ValueError, match=rf"{capacity} tokens; the context length is {capacity}"):
        llm.generate(input_ids=[5] * capacity, sampling_params={"max_new_tokens": 1})
    assert not any(isinstance(m, AddRequest) for m in sent)  # refused before anything reached the core
    # One token less fits: the prompt plus one output token.
    out = llm.generate(input_ids=[5] * (capacity - 1), sampling_params={"max_new_tokens": 1})
    assert out["meta_info"]["completion_tokens"] == 1


def test_prompt_beyond_the_kv_pool_is_a_400_over_http(llm) -> None:
    capacity = llm.model_info["kv_capacity"]
    app = create_app(llm, shutdown_engine=False)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return [
                await http.post("/v1/completions", json={"prompt": [5] * capacity, "max_tokens": 1}),
                await http.post("/generate", json={"input_ids": [5] * capacity, "stream": True}),
            ]

    for r in asyncio.run(main()):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == 400
        assert f"the context length is {capacity}" in error["message"]


def test_server_info_reports_the_resolved_runtime(llm) -> None:
    info = llm.get_server_info()
    assert info["runtime"] == llm.model_info["runtime"]
    assert info["config"]["stream_interval"] == 3
    assert isinstance(info["runtime"], dict)
    if info["runtime"]:  # filled by the core's RuntimeConfig (empty from a core that predates it)
        assert info["runtime"]["kv_capacity"] == llm.model_info["kv_capacity"]


def test_detokenization_runs_off_the_event_loops(llm, monkeypatch) -> None:
    detok = llm.tokenizer_manager.detokenizer
    threads: list[threading.Thread] = []
    real_step = detok.step

    def recording_step(*args, **kwargs):
        threads.append(threading.current_thread())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(detok, "step", recording_step)

    async def main():
        loop_thread = threading.current_thread()
        gen = await llm.async_generate(prompt="Hello there", sampling_params=GREEDY, stream=True)
        return loop_thread, [c async for c in gen]

    caller_loop_thread, chunks = asyncio.run(main())
    llm.generate(prompt="Hello there", sampling_params=GREEDY)  # on the Engine's private loop
    assert len(chunks) == 4 and len(threads) == 4 + 1
    assert not {caller_loop_thread, llm._loop_thread} & set(threads)


def test_inline_shutdown_ends_running_requests_with_an_abort() -> None:
    engine = Engine(
        model_path=str(cached_model_folder("qwen2")),
        dtype="float32",
        max_total_tokens=4096,
        inline_core=True,
        log_level="warning",
    )
    long = {"max_new_tokens": 3000, "temperature": 0, "ignore_eos": True}
    started = threading.Event()

    async def consume():
        gen = await engine.async_generate(prompt="a long story", sampling_params=long, stream=True)
        chunks = []
        async for c in gen:
            chunks.append(c)
            started.set()
        return chunks

    result: list = []
    worker = threading.Thread(target=lambda: result.append(asyncio.run(consume())))
    worker.start()
    assert started.wait(60)
    engine.shutdown()
    worker.join(timeout=10)
    assert not worker.is_alive(), "a request outlived the engine's shutdown"
    reason = result[0][-1]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 503
    assert result[0][-1]["meta_info"]["completion_tokens"] < 3000


def test_token_texts_decode_each_token_alone(llm) -> None:
    tm = llm.tokenizer_manager
    ids = tm.encode("naïve 日本 😀 <|im_end|> done") + [0, 1, 2]
    assert tm.token_texts(ids) == [tm.decode([t], skip_special_tokens=False) for t in ids]
