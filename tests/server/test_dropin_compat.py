"""Drop-in compatibility (issue 10): what SGLang's and vLLM's clients send on their first request works.

One real server process started by its CLI the way a vLLM user starts one (positional MODEL, `--dtype
float`), with SGLang's metric names on, over a copy of the tiny test model whose generation_config.json
sets sampling defaults (top_k 1 makes unset requests greedy, which is what the defaults test observes).
No --strict-model-name: any model name is served.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

import radixlm
from radixlm.testing import cached_model_folder
from tests.server.test_server import Server, _sse, _stop, launch

SERVED = "compat-model"
# The model's own sampling defaults, as Qwen2.5-Instruct ships them (top_k 1 here: greedy, observable).
GENERATION_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 1, "repetition_penalty": 1.0}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def model_with_generation_defaults(out: Path) -> Path:
    shutil.copytree(cached_model_folder("qwen2", "tiny"), out, dirs_exist_ok=True)
    path = out / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **GENERATION_DEFAULTS}))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = model_with_generation_defaults(tmp_path_factory.mktemp("gen-defaults-model"))
    srv = launch(
        [
            str(model),  # vLLM's positional MODEL
            "--dtype",
            "float",  # SGLang's / vLLM's alias of float32
            "--served-model-name",
            SERVED,
            "--max-total-tokens",
            "20000",
            "--enable-metrics",
            "--metrics-prefix",
            "sglang",
        ]
    )
    try:
        yield srv
    finally:
        clean, _ = _stop(srv)
    assert clean, srv.log_tail()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(srv: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60)


MESSAGES = [{"role": "user", "content": "Say something"}]


# ---- model names --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["default", "gpt-4o", "some/other-model"])
def test_any_model_name_is_served_and_the_response_names_the_served_model(
    client: openai.OpenAI, server: Server, name: str
) -> None:
    chat = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=3)
    assert chat.model == SERVED and chat.choices[0].message.content is not None
    completion = client.completions.create(model=name, prompt="Hello", max_tokens=3)
    assert completion.model == SERVED
    assert client.models.retrieve(name).id == SERVED


# ---- nulls, and other servers' fields -------------------------------------------------------------------
def test_openai_client_with_default_model_and_fields_set_to_none(client: openai.OpenAI) -> None:
    nones = dict(
        temperature=None,
        top_p=None,
        n=None,
        stop=None,
        seed=None,
        presence_penalty=None,
        frequency_penalty=None,
        user=None,
        logit_bias=None,
    )
    chat = client.chat.completions.create(
        model="default",
        messages=MESSAGES,
        max_tokens=4,
        logprobs=None,
        top_logprobs=None,
        response_format=None,
        tools=None,
        tool_choice=None,
        parallel_tool_calls=None,
        metadata=None,
        store=None,
        stream_options=None,
        reasoning_effort=None,
        prediction=None,
        audio=None,
        modalities=None,
        functions=None,
        function_call=None,
        service_tier=None,
        extra_body={"top_k": None, "regex": None, "json_schema": None, "min_p": None},
        **nones,
    )
    assert len(chat.choices) == 1 and chat.usage.completion_tokens <= 4
    completion = client.completions.create(
        model="default", prompt="Hello", max_tokens=4, logprobs=None, echo=None, best_of=None, suffix=None, **nones
    )
    assert len(completion.choices) == 1 and completion.choices[0].logprobs is None


def test_json_null_means_the_default(server: Server) -> None:
    r = post(
        server,
        "/v1/completions",
        {"prompt": "Hi", "n": None, "stream": None, "logprobs": None, "max_tokens": None, "echo": None},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 1 and body["choices"][0]["logprobs"] is None
    assert body["usage"]["completion_tokens"] <= 16  # OpenAI's default max_tokens for completions
    chat = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "logprobs": None})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["logprobs"] is None


def test_harmless_openai_fields_are_ignored(server: Server) -> None:
    r = post(
        server,
        "/v1/chat/completions",
        {
            "messages": MESSAGES,
            "max_tokens": 2,
            "service_tier": "auto",
            "prompt_cache_key": "k1",
            "safety_identifier": "someone",
            "user": "someone",
            "modalities": ["text"],
            "store": False,
        },
    )
    assert r.status_code == 200, r.text


REFUSED = [
    ("functions", "/v1/chat/completions", {"messages": MESSAGES, "functions": [{"name": "f"}]}, "functions"),
    ("audio-modality", "/v1/chat/completions", {"messages": MESSAGES, "modalities": ["audio"]}, "modalities"),
    # (regex, json_schema, ebnf, guided_*, ... are supported now: tests/server/test_structured_output.py)
    ("chat-lora", "/v1/chat/completions", {"messages": MESSAGES, "lora_path": "x"}, "lora_path"),
    ("generate-beam", "/generate", {"text": "x", "sampling_params": {"beam_width": 2}}, "sampling_params.beam_width"),
    (
        "generate-stop-regex",
        "/generate",
        {"text": "x", "sampling_params": {"stop_regex": ["a+"]}},
        "sampling_params.stop_regex",
    ),
    ("generate-token-ids-logprob", "/generate", {"text": "x", "token_ids_logprob": [1]}, "token_ids_logprob"),
    ("generate-hidden", "/generate", {"text": "x", "return_hidden_states": True}, "return_hidden_states"),
    ("generate-image", "/generate", {"text": "x", "image_data": "abc"}, "image_data"),
    ("still-unknown", "/v1/completions", {"prompt": "x", "frobnicate": 1}, "frobnicate"),
]


@pytest.mark.parametrize(
    ("route", "body", "param"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_fields_with_an_effect_we_lack_are_refused_by_name(server: Server, route: str, body: dict, param: str) -> None:
    r = post(server, route, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param.split(".")[-1] in error["message"]


def test_generate_accepts_what_sglangs_frontend_sends(server: Server) -> None:
    # The body SGLang's RuntimeEndpoint.generate builds for `gen(...)` (unset options as null / []).
    sampling = {
        "skip_special_tokens": True,
        "spaces_between_special_tokens": True,
        "max_new_tokens": 6,
        "min_new_tokens": 0,
        "n": 1,
        "stop": [],
        "stop_token_ids": [],
        "stop_regex": [],
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "ignore_eos": True,
        "regex": None,
        "json_schema": None,
        "sampling_seed": 11,
    }
    body = {
        "text": "Once upon",
        "sampling_params": sampling,
        "return_logprob": True,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
        "logprob_start_len": -1,
        "log_metrics": True,
    }
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    assert len(out["output_ids"]) == 6
    texts = [entry[2] for entry in meta["output_token_logprobs"]]
    assert all(isinstance(t, str) for t in texts) and [e[1] for e in meta["output_token_logprobs"]] == out[
        "output_ids"
    ]
    assert all(isinstance(alt[2], str) for row in meta["output_top_logprobs"] for alt in row)
    # sampling_seed is SGLang's name for seed: the same draw.
    seeded = {k: v for k, v in sampling.items() if k != "sampling_seed"} | {"seed": 11}
    same = post(server, "/generate", {"text": "Once upon", "sampling_params": seeded}).json()
    assert same["output_ids"] == out["output_ids"]
    # Streamed, the entries carry their text too.
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, timeout=60) as s:
        events = _sse(s.iter_lines())
    assert events[-1] == "[DONE]"
    assert [e[2] for e in events[-2]["meta_info"]["output_token_logprobs"]] == texts


# ---- the model's sampling defaults -------------------------------------------------------------------------
def test_generation_config_defaults_apply_when_a_request_leaves_them_unset(
    client: openai.OpenAI, server: Server
) -> None:
    greedy = client.completions.create(
        model="default", prompt="The weather", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    ).choices[0].text
    # No seed, no temperature: the file's top_k=1 makes these greedy (temperature 1 would be random).
    unset = [
        client.completions.create(
            model="default", prompt="The weather", max_tokens=8, extra_body={"ignore_eos": True}
        ).choices[0].text
        for _ in range(3)
    ]
    assert unset == [greedy] * 3
    chat_greedy = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, temperature=0)
    chat_unset = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6)
    assert chat_unset.choices[0].message.content == chat_greedy.choices[0].message.content
    native = post(
        server, "/generate", {"text": "The weather", "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}
    ).json()
    assert native["text"] == greedy
    # What a request sets wins over the file: top_k -1 samples, so seeds give different texts.
    sampled = {
        client.completions.create(
            model="default", prompt="The weather", max_tokens=8, seed=s, extra_body={"top_k": -1, "ignore_eos": True}
        ).choices[0].text
        for s in range(4)
    }
    assert len(sampled) > 1


# ---- chat logprobs --------------------------------------------------------------------------------------
def test_chat_logprobs_do_not_list_the_stop_token_the_text_omits(server: Server, client: openai.OpenAI) -> None:
    prompt_ids = post(server, "/tokenize", {"messages": MESSAGES})
    assert prompt_ids.status_code == 200, prompt_ids.text
    ids = prompt_ids.json()["tokens"]
    out = post(
        server,
        "/generate",
        {"input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}},
    ).json()["output_ids"]
    k = max(i for i in range(len(out)) if out[i] not in out[:i])  # the last token to first appear at k
    stop = out[k]  # ends the answer as <|im_end|> would: a stop token, left out of the text

    def ask(stream: bool):
        return client.chat.completions.create(
            model="default",
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            logprobs=True,
            top_logprobs=1,
            stream=stream,
            extra_body={"stop_token_ids": [stop], "ignore_eos": True},
        )

    full = ask(False)
    choice = full.choices[0]
    assert choice.finish_reason == "stop" and full.usage.completion_tokens == k + 1
    assert len(choice.logprobs.content) == k
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    streamed = [t for c in ask(True) if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in choice.logprobs.content]


# ---- routes ---------------------------------------------------------------------------------------------------
def test_tokenize_and_detokenize(server: Server, client: openai.OpenAI) -> None:
    text = "Hello there, world"
    tok = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0
    back = post(server, "/detokenize", {"tokens": tok["tokens"]}).json()
    assert back["text"] == back["prompt"] == text
    many = post(server, "/v1/tokenize", {"prompt": [text, "Hi"], "add_special_tokens": False}).json()
    assert many["tokens"][0] == tok["tokens"] and many["count"] == [len(t) for t in many["tokens"]]
    assert post(server, "/v1/detokenize", {"tokens": many["tokens"]}).json()["text"] == [text, "Hi"]
    chat_prompt = post(server, "/tokenize", {"messages": MESSAGES}).json()
    usage = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=1).usage
    assert chat_prompt["count"] == usage.prompt_tokens
    bad = post(server, "/detokenize", {"tokens": [1, 10**7]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert post(server, "/tokenize", {"prompt": "x", "messages": MESSAGES}).status_code == 400


def test_version_load_ping_and_sglang_info_names(server: Server) -> None:
    assert httpx.get(server.url + "/version").json() == {"version": radixlm.__version__}
    load = httpx.get(server.url + "/get_load").json()
    assert load[0]["dp_rank"] == 0 and {"num_reqs", "num_waiting_reqs", "num_tokens"} <= set(load[0])
    assert isinstance(httpx.get(server.url + "/load").json()["server_load"], int)
    assert httpx.get(server.url + "/ping").status_code == 200
    assert httpx.post(server.url + "/ping").status_code == 200
    info = httpx.get(server.url + "/model_info").json()
    assert info["served_model_name"] == SERVED and info == httpx.get(server.url + "/get_model_info").json()
    assert "kv_capacity" in httpx.get(server.url + "/server_info").json()


def test_sglang_metric_names_alongside_radixlm(server: Server, client: openai.OpenAI) -> None:
    client.completions.create(model="default", prompt="metrics", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text

    def value(name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    for suffix in (
        "num_running_reqs",
        "num_queue_reqs",
        "token_usage",
        "cache_hit_rate",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_count",
        "e2e_request_latency_seconds_count",
    ):
        assert value(f"sglang:{suffix}") == value(f"radixlm:{suffix}"), suffix
    assert value("sglang:generation_tokens_total") >= 3
    assert "sglang:num_used_tokens" in text


# ---- the command line ---------------------------------------------------------------------------------------
def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "radixlm.launch_server", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("radixlm serve: error:")]
    assert len(ours) == 1, proc.stderr[-2000:]
    return ours[0]


def test_cli_user_errors_are_one_line(tmp_path: Path) -> None:
    assert "no such folder" in _error_line(_run_cli("--model-path", str(tmp_path / "missing"), "--port", "0"))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(cached_model_folder("qwen2", "tiny"), no_weights)
    (no_weights / "model.safetensors").unlink()
    assert "safetensors" in _error_line(_run_cli(str(no_weights), "--port", "0"))
    # No model at all: tests/server/test_default_model.py (the packaged SmolLM2 is served when installed).
    assert "two models given" in _error_line(_run_cli("a", "--model-path", "b"))


def test_a_port_in_use_is_refused_before_the_model_loads() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        proc = _run_cli("--model", str(cached_model_folder("qwen2", "tiny")), "--port", str(port))
        took = time.monotonic() - t0
    line = _error_line(proc)
    assert str(port) in line and "another --port" in line
    # Refused before the model loads: the core never started (it logs the model it loads).
    assert "implementation" not in proc.stderr and took < 30


def test_version_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from radixlm.cli import main; raise SystemExit(main(['--version']))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == f"radixlm {radixlm.__version__}"


def test_other_servers_flag_spellings_parse() -> None:
    from radixlm.cli_args import config_from_args
    from radixlm.launch_server import build_parser

    ns = build_parser().parse_args(["--model", "some/model", "--dtype", "half", "--model-impl", "sglang"])
    config = config_from_args(ns)
    assert (config.model_path, config.dtype, config.model_impl) == ("some/model", "float16", "native")
    assert config_from_args(build_parser().parse_args(["--dtype", "float"])).dtype == "float32"
