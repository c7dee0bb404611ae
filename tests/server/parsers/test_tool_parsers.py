"""Tool-call parsers, one format at a time: whole outputs, and the same outputs streamed in pieces split at
every position (a marker or a JSON object cut anywhere must give the same content and calls)."""

from __future__ import annotations

import json
import random

import pytest

from radixlm.server.parsers import TOOL_PARSERS, JsonArrayToolParser, default_tool_parser
from radixlm.server.parsers.named import NamedToolStream
from radixlm.server.parsers.tool_call import ToolParser

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"tz": "Europe/Paris"}

# format -> (model text, expected content, expected [(name, arguments)])
CASES: dict[str, list[tuple[str, str, list[tuple[str, dict]]]]] = {
    "hermes": [
        (
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
            "Let me check.\n",
            [("get_weather", WEATHER), ("get_time", TIME)],
        ),
        # stopped (EOS) before the closing tag
        ('<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}', "", [("get_time", TIME)]),
        ("No tools needed: 1 < 2 and <tool is not a tag.", "No tools needed: 1 < 2 and <tool is not a tag.", []),
    ],
    "llama3": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "", [("get_weather", WEATHER)]),
        (
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
            '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}',
            "",
            [("get_weather", WEATHER), ("get_time", TIME)],
        ),
        ("The weather is {sunny}.", "The weather is {sunny}.", []),
        ("{not json at all", "{not json at all", []),
    ],
    "mistral": [
        (
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
            '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]',
            "",
            [("get_weather", WEATHER), ("get_time", TIME)],
        ),
        (
            'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]'
            '{"tz": "Europe/Paris"}',
            "Sure. ",
            [("get_weather", WEATHER), ("get_time", TIME)],
        ),
        ("Plain [TOOL answer", "Plain [TOOL answer", []),
    ],
    "pythonic": [
        (
            '[get_weather(city="Paris", unit="celsius"), get_time(tz="Europe/Paris")]',
            "",
            [("get_weather", WEATHER), ("get_time", TIME)],
        ),
        ('<|python_start|>[get_time(tz="Europe/Paris")]<|python_end|>', "", [("get_time", TIME)]),
        ("[1, 2] is a list, not a call", "[1, 2] is a list, not a call", []),
    ],
}


def _cases() -> list[tuple[str, str, str, list]]:
    return [(fmt, *case) for fmt, cases in CASES.items() for case in cases]


def _named(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def _streamed(parser: ToolParser, pieces: list[str]) -> tuple[str, list[tuple[str, dict]], list]:
    s = parser.stream()
    deltas = [s.feed(p) for p in pieces] + [s.finish()]
    content = "".join(d.content for d in deltas)
    calls = [c for d in deltas for c in d.calls]
    return content, [(c.name, json.loads(c.arguments)) for c in calls], calls


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), _cases())
def test_whole_output(fmt: str, text: str, content: str, calls: list) -> None:
    got_content, got_calls = TOOL_PARSERS[fmt]().parse(text)
    assert got_content == content
    assert _named(got_calls) == calls


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), _cases())
def test_streamed_split_at_every_position(fmt: str, text: str, content: str, calls: list) -> None:
    for cut in range(1, len(text)):
        got_content, got_calls, raw = _streamed(TOOL_PARSERS[fmt](), [text[:cut], text[cut:]])
        assert (got_content, got_calls) == (content, calls), f"split at {cut}: {text[:cut]!r} | {text[cut:]!r}"
        assert [c.index for c in raw] == list(range(len(calls)))
        assert all(c.id and c.id.startswith("call_") for c in raw)


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), _cases())
def test_streamed_one_character_at_a_time_and_random_pieces(fmt: str, text: str, content: str, calls: list) -> None:
    assert _streamed(TOOL_PARSERS[fmt](), list(text))[:2] == (content, calls)
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(5, len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert _streamed(TOOL_PARSERS[fmt](), pieces)[:2] == (content, calls)


def test_content_is_streamed_before_a_call_and_a_marker_prefix_is_held_back() -> None:
    s = TOOL_PARSERS["hermes"]().stream()
    assert s.feed("Hello <tool").content == "Hello "  # "<tool" may start "<tool_call>"
    d = s.feed('_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    assert d.content == "" and [(c.name, c.arguments) for c in d.calls] == [("f", "{}")]
    assert s.finish().calls == []


def test_a_call_is_sent_once_it_is_complete_not_before() -> None:
    s = TOOL_PARSERS["hermes"]().stream()
    assert s.feed('<tool_call>\n{"name": "f", "arguments": {"a": ').calls == []
    assert s.feed('1}}\n</tool_call>').calls[0].arguments == '{"a": 1}'


def test_required_json_array_streams_each_element_when_complete() -> None:
    s = JsonArrayToolParser().stream()
    assert s.feed('[{"name": "f", "parameters": {"x": 1}}, {"na').calls[0].name == "f"
    d = s.feed('me": "g", "parameters": {}}]')
    assert [(c.index, c.name, c.arguments) for c in d.calls] == [(1, "g", "{}")]


def test_named_tool_streams_arguments_as_they_come() -> None:
    s = NamedToolStream("f")
    first, second = s.feed('{"a"'), s.feed(": 1}")
    assert first.calls[0].id and first.calls[0].name == "f" and first.calls[0].arguments == '{"a"'
    assert second.calls[0].id is None and second.calls[0].name is None and second.calls[0].arguments == ": 1}"
    assert first.calls[0].to_openai()["type"] == "function" and "type" not in second.calls[0].to_openai()


def test_default_parser_from_the_chat_template() -> None:
    assert default_tool_parser("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert default_tool_parser("[TOOL_CALLS] {{ x }}") == "mistral"
    assert default_tool_parser("<|python_tag|>") == "llama3"
    assert default_tool_parser("<tool_call> and [TOOL_CALLS]") is None  # ambiguous: no default
    assert default_tool_parser("{{ messages }}") is None and default_tool_parser(None) is None
