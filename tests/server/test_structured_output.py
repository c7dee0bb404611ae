"""Structured output, tools and reasoning through a real `radixlm serve` (issue 13), on random weights.

One server over a copy of the tiny model whose tokenizer carries a Hermes/Qwen-style tool template
(radixlm/testing/tool_template.py), so --tool-call-parser defaults to hermes, and --reasoning-parser qwen3.
Clients: the official `openai` client (its beta parse() with pydantic models, tools) and raw HTTP. Where a
test needs the model to write a particular text (a tool call for tool_choice auto, a think block), a
`regex` extra makes the random model write it: the parsers then see exactly what a real model would send.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

from radixlm.testing import cached_model_folder
from radixlm.testing.tool_template import with_tool_template
from tests.core.grammar_schemas import SCHEMAS
from tests.server.test_server import Server, _sse, _stop, launch

USER = [{"role": "user", "content": "Answer in JSON"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return with_tool_template(cached_model_folder("qwen2", "tiny"), tmp_path_factory.mktemp("tool-model"))


@pytest.fixture(scope="module")
def server(model) -> Iterator[Server]:
    srv = launch(
        ["--model-path", str(model), "--dtype", "float32", "--max-total-tokens", "20000", "--reasoning-parser", "qwen3"]
    )
    try:
        yield srv
    finally:
        clean, _ = _stop(srv)
    assert clean, srv.log_tail()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(srv: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=120)


def chat(srv: Server, **body) -> dict:
    r = post(srv, "/v1/chat/completions", {"messages": USER, "max_tokens": 200, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---- response_format and the SDK's parse() --------------------------------------------------------------
class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)


class Pet(BaseModel):
    kind: Literal["cat", "dog", "bird"]
    legs: int = Field(ge=0, le=4)
    vaccinated: bool


class Point(BaseModel):
    x: float = Field(ge=-5, le=5)
    y: float = Field(ge=-5, le=5)


class Segment(BaseModel):
    start: Point
    end: Point
    label: str = Field(max_length=4)


class Order(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{2}$")
    quantities: list[Annotated[int, Field(ge=0, le=99)]] = Field(max_length=3)
    status: Literal["new", "shipped"]


@pytest.mark.parametrize("cls", [Person, Pet, Point, Segment, Order])
def test_sdk_parse_returns_the_pydantic_object(client: openai.OpenAI, cls: type[BaseModel]) -> None:
    done = client.beta.chat.completions.parse(
        model="m", messages=USER, response_format=cls, max_tokens=300, temperature=1.0
    )
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, cls), done.choices[0].message.content
    assert done.choices[0].finish_reason == "stop"


def test_json_object_and_json_schema_response_formats(server: Server) -> None:
    out = chat(server, response_format={"type": "json_object"}, n=4, temperature=1.0, max_tokens=60)
    for c in out["choices"]:
        # Any object: random weights rarely close its free-form keys within the budget, so a cut one is
        # allowed here; what it wrote must still be the start of an object.
        text = c["message"]["content"]
        assert text.startswith("{")
        if c["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
    schema = SCHEMAS["nested-object"]
    rf = {"type": "json_schema", "json_schema": {"name": "nested", "schema": schema, "strict": True}}
    out = chat(server, response_format=rf, n=5, temperature=1.0)
    for c in out["choices"]:
        jsonschema.validate(json.loads(c["message"]["content"]), schema)


def test_response_format_streams_a_valid_document(server: Server) -> None:
    schema = SCHEMAS["defs-and-refs"]
    rf = {"type": "json_schema", "json_schema": {"name": "pts", "schema": schema}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      json={"messages": USER, "max_tokens": 200, "stream": True, "response_format": rf}) as r:
        assert r.status_code == 200
        events = _sse(r.iter_lines())
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e != "[DONE]" and e["choices"])
    jsonschema.validate(json.loads(text), schema)


# ---- SGLang's and vLLM's spellings ----------------------------------------------------------------------
def test_guided_choice_regex_json_grammar(client: openai.OpenAI) -> None:
    def content(**extra) -> str:
        r = client.chat.completions.create(model="m", messages=USER, max_tokens=100, temperature=1.0,
                                           extra_body=extra)
        return r.choices[0].message.content

    for _ in range(5):
        assert content(guided_choice=["yes", "no", "maybe so"]) in ("yes", "no", "maybe so")
        assert content(structured_outputs={"choice": ["left", "right"]}) in ("left", "right")
    assert re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{2}", content(guided_regex=r"[A-Z][a-z]{2,5} [0-9]{2}"))
    jsonschema.validate(json.loads(content(guided_json=SCHEMAS["enum-and-const"])), SCHEMAS["enum-and-const"])
    assert re.fullmatch(r"[0-9]+(\+[0-9]+)*", content(guided_grammar='root ::= n ("+" n){0,3}\nn ::= [0-9]{1,3}'))
    assert re.fullmatch("(ab)+", content(regex="(ab)+"))  # SGLang's extra


def test_completions_and_generate_take_sglang_keys(server: Server) -> None:
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 80, "json_schema": json.dumps(SCHEMAS["any-of"])})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), SCHEMAS["any-of"])
    body = {"text": ["a", "b"], "sampling_params": {"max_new_tokens": 40, "regex": "[0-9]{3}-[a-z]{2}"}}
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    assert all(re.fullmatch("[0-9]{3}-[a-z]{2}", o["text"]) for o in r.json())
    r = post(server, "/generate", {"text": "c", "sampling_params": {"max_new_tokens": 40, "ebnf": 'root ::= "x" [0-9]'}})
    assert re.fullmatch("x[0-9]", r.json()["text"])


BAD = [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "nope"}}}}, "response_format"),
    ("/v1/chat/completions", {"guided_regex": "(unclosed"}, "guided_regex"),
    ("/v1/chat/completions", {"guided_grammar": "root ::= missing"}, "guided_grammar"),
    ("/v1/chat/completions", {"guided_json": "{not json"}, "guided_json"),
    ("/v1/chat/completions", {"stream": True, "regex": "(a"}, "regex"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "[a"}}, "structured_outputs.regex"),
    ("/generate", {"text": "x", "sampling_params": {"regex": "(a"}}, "sampling_params.regex"),
    ("/v1/chat/completions", {"regex": "a", "guided_choice": ["b"]}, "guided_choice"),
]


@pytest.mark.parametrize(("route", "body", "param"), BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_a_constraint_that_does_not_compile_is_a_400_naming_the_field(server: Server, route, body, param) -> None:
    if route != "/generate" and "prompt" not in body:
        body = {"messages": USER, **body}
    r = post(server, route, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


# ---- tools ----------------------------------------------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
SCHEMA_OF = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}


def test_tool_choice_required_gives_valid_calls(client: openai.OpenAI) -> None:
    for parallel in (False, True):
        r = client.chat.completions.create(model="m", messages=USER, tools=[WEATHER, TIME], tool_choice="required",
                                           parallel_tool_calls=parallel, max_tokens=300, temperature=1.0, n=3)
        for choice in r.choices:
            assert choice.finish_reason == "tool_calls"
            calls = choice.message.tool_calls
            assert calls and (parallel or len(calls) == 1)
            for call in calls:
                assert call.id.startswith("call_") and call.type == "function"
                jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_named_tool_choice(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model="m", messages=USER, tools=[WEATHER, TIME], tool_choice=named, max_tokens=100)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF["get_time"])


HAND_WRITTEN = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'


def test_auto_parses_the_models_own_format(client: openai.OpenAI) -> None:
    # The regex makes the random model write a Hermes tool call; the default parser (from the template) reads it.
    r = client.chat.completions.create(model="m", messages=USER, tools=[WEATHER], max_tokens=100,
                                       extra_body={"regex": re.escape(HAND_WRITTEN)})
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Checking.\n"
    (call,) = msg.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo", "unit": "celsius"}


def test_auto_streams_openai_shaped_tool_call_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="m", messages=USER, tools=[WEATHER], max_tokens=100, stream=True,
                                            extra_body={"regex": re.escape(HAND_WRITTEN)})
    content, calls, finish = "", {}, None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
                entry["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert content == "Checking.\n" and finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"] and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    assert "<tool_call>" not in content


def test_required_streams_tool_calls(server: Server) -> None:
    body = {"messages": USER, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 200, "stream": True,
            "parallel_tool_calls": False}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        events = [e for e in _sse(r.iter_lines()) if e != "[DONE]"]
    pieces = [tc for e in events for c in e["choices"] for tc in c["delta"].get("tool_calls") or []]
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"]["name"] == "get_weather"
    args = "".join(p["function"]["arguments"] for p in pieces)
    jsonschema.validate(json.loads(args), SCHEMA_OF["get_weather"])
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_multi_turn_with_a_tool_result_renders_as_apply_chat_template(server: Server, model) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"},
    ]
    hf_messages = [
        messages[0],
        messages[1],
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"},
    ]
    expected = AutoTokenizer.from_pretrained(model).apply_chat_template(
        hf_messages, tools=[WEATHER], add_generation_prompt=True, tokenize=False
    )
    assert "<tool_response>\nsunny, 21\n</tool_response>" in expected and '"arguments": {"city": "Oslo"' in expected
    ids = AutoTokenizer.from_pretrained(model).encode(expected, add_special_tokens=False)
    r = post(server, "/tokenize", {"messages": messages, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == ids
    out = chat(server, messages=messages, tools=[WEATHER], max_tokens=3)
    assert out["usage"]["prompt_tokens"] == len(ids)


def test_tool_choice_without_tools_is_a_400(server: Server) -> None:
    r = post(server, "/v1/chat/completions", {"messages": USER, "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = post(server, "/v1/chat/completions", {"messages": USER, "tools": [WEATHER],
                                               "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]


# ---- reasoning ------------------------------------------------------------------------------------------
THINK = r"<think>[a-z]{3,8}</think>\n\n[A-Z][a-z]{2,5}"


def test_reasoning_content_is_split_out(server: Server) -> None:
    msg = chat(server, regex=THINK, chat_template_kwargs={"enable_thinking": True})["choices"][0]["message"]
    assert re.fullmatch("[a-z]{3,8}", msg["reasoning_content"]) and re.fullmatch("[A-Z][a-z]{2,5}", msg["content"])
    kept = chat(server, regex=THINK, separate_reasoning=False)["choices"][0]["message"]
    assert re.fullmatch(THINK, kept["content"]) and kept.get("reasoning_content") is None


def test_reasoning_streams_as_reasoning_content_deltas(server: Server) -> None:
    body = {"messages": USER, "max_tokens": 60, "stream": True, "regex": THINK}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        events = [e for e in _sse(r.iter_lines()) if e != "[DONE]" and e["choices"]]
    deltas = [e["choices"][0]["delta"] for e in events]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert re.fullmatch("[a-z]{3,8}", reasoning) and re.fullmatch("[A-Z][a-z]{2,5}", content)
    assert not any("<think>" in (d.get("content") or "") + (d.get("reasoning_content") or "") for d in deltas)
