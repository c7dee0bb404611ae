"""Prompt logprobs and logit_bias over HTTP, against a real server process (tests/server/test_server.py's).

/generate: SGLang's logprob_start_len -> meta_info.input_token_logprobs ([logprob, id, text-or-null],
logprob null at position 0), with max_new_tokens 0 for scoring only. /v1/completions: echo with logprobs
lists the prompt's tokens first (the first with a null logprob), as OpenAI and vLLM do. logit_bias on
both OpenAI routes. The values are checked against transformers' own forward (the server runs the same
tiny qwen2 folder in float32).
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.core.test_prompt_logprobs import ATOL, hf_prompt_logprobs
from tests.server.test_server import Server

PROMPT = [5, 17, 33, 2, 90, 41, 7, 300]


@pytest.fixture(scope="module")
def server(plain_server: Server) -> Server:
    return plain_server


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def close(ours: list, ref: list[float]) -> bool:
    return len(ours) == len(ref) and max(abs(a - b) for a, b in zip(ours, ref)) < ATOL


# ---- /generate ----------------------------------------------------------------------------------
def test_generate_input_token_logprobs_with_text(server: Server) -> None:
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 0, "temperature": 0},
        "return_logprob": True,
        "return_text_in_logprobs": True,
        "top_logprobs_num": 2,
        "logprob_start_len": 0,
    }
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    assert out["output_ids"] == [] and meta["finish_reason"] == {"type": "length", "length": 0}
    entries = meta["input_token_logprobs"]
    assert [e[1] for e in entries] == PROMPT
    assert entries[0][0] is None and all(isinstance(e[2], str) for e in entries)
    ref, _ = hf_prompt_logprobs(PROMPT)
    assert close([e[0] for e in entries[1:]], ref)
    tops = meta["input_top_logprobs"]
    assert tops[0] is None and all(len(row) == 2 and isinstance(row[0][2], str) for row in tops[1:])
    assert meta["output_token_logprobs"] == []


def test_generate_from_the_middle_of_the_prompt_and_batched(server: Server) -> None:
    body = {
        "input_ids": [PROMPT, PROMPT[:6]],
        "sampling_params": {"max_new_tokens": 2, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": 4,
    }
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    for out, prompt in zip(r.json(), [PROMPT, PROMPT[:6]]):
        entries = out["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in entries] == prompt[4:]
        ref, _ = hf_prompt_logprobs(prompt)
        assert close([e[0] for e in entries], ref[3:])
        assert len(out["meta_info"]["output_token_logprobs"]) == 2


@pytest.mark.parametrize("value", [-2, 1.5, "3", True, 8])
def test_generate_bad_logprob_start_len_is_400_naming_it(server: Server, value) -> None:
    body = {"input_ids": PROMPT, "return_logprob": True, "sampling_params": {"max_new_tokens": 1}}
    ok = post(server, "/generate", {**body, "logprob_start_len": 7})  # the last valid start
    assert ok.status_code == 200, ok.text
    r = post(server, "/generate", {**body, "logprob_start_len": value})
    assert r.status_code == 400, r.text
    assert "logprob_start_len" in json.dumps(r.json()["error"])


# ---- /v1/completions echo ------------------------------------------------------------------------
def test_completion_echo_with_logprobs_lists_the_prompt_first(server: Server) -> None:
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    n = len(PROMPT)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref, _ = hf_prompt_logprobs(PROMPT)
    assert close(lp["token_logprobs"][1:n], ref)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(len(t) <= 2 for t in lp["top_logprobs"][1:])

    # Streamed: the same lists, the echoed prompt's chunk first.
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120
    ) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0].get("logprobs")]
    assert [x for part in streamed for x in part["token_logprobs"]] == lp["token_logprobs"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == r.json()["choices"][0]["text"]


def test_completion_echo_scores_a_prompt_with_max_tokens_zero(server: Server) -> None:
    body = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["token_logprobs"]) == len(PROMPT)
    assert r.json()["usage"]["completion_tokens"] == 0


# ---- logit_bias ---------------------------------------------------------------------------------
def test_logit_bias_forces_and_bans_tokens(server: Server) -> None:
    base = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 0}
    forced = post(server, "/v1/completions", {**base, "logit_bias": {"123": 100}})
    assert forced.status_code == 200, forced.text
    gen = post(
        server, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    )
    first = gen.json()["output_ids"][0]
    banned = post(server, "/v1/completions", {**base, "logit_bias": {str(first): -100}})
    assert banned.status_code == 200, banned.text
    forced_ids = post(
        server,
        "/generate",
        {
            "input_ids": PROMPT,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0, "logit_bias": {"123": 100}},
        },
    ).json()["output_ids"]
    assert forced_ids == [123] * 4
    banned_ids = post(
        server,
        "/generate",
        {
            "input_ids": PROMPT,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0, "logit_bias": {str(first): -100}},
        },
    ).json()["output_ids"]
    assert first not in banned_ids
    chat = post(
        server,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3,
            "temperature": 0,
            "logit_bias": {"123": 100},
        },
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("bias", [{"5": 101}, {"5": -100.5}, {"abc": 1}, {"5": "x"}, {"99999999": 1}, [1, 2]])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_bad_logit_bias_is_400_naming_it(server: Server, route: str, bias) -> None:
    body = {"max_tokens": 2, "logit_bias": bias}
    body.update(
        {"prompt": "Hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    )
    ok = post(server, route, {**body, "logit_bias": {"5": 100, "6": -100}})  # the range's ends are valid
    assert ok.status_code == 200, ok.text
    r = post(server, route, body)
    assert r.status_code == 400, r.text
    assert "logit_bias" in json.dumps(r.json()["error"])
