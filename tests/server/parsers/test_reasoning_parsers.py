"""Reasoning parsers: whole outputs and streams, with the think markers split across deltas."""

from __future__ import annotations

import pytest

from radixlm.server.parsers import REASONING_PARSERS

# (parser, force, output, reasoning, content)
CASES = [
    ("qwen3", None, "<think>\nstep 1, step 2\n</think>\n\nThe answer is 4.", "\nstep 1, step 2\n", "The answer is 4."),
    ("qwen3", None, "The answer is 4.", "", "The answer is 4."),  # enable_thinking=False
    ("qwen3", None, "<think>never closed", "never closed", ""),
    ("qwen3", True, "opened by the template</think>answer", "opened by the template", "answer"),
    ("deepseek-r1", None, "thinking hard</think>\n\nanswer", "thinking hard", "answer"),
    ("deepseek-r1", None, "<think>again</think>answer", "again", "answer"),
    ("deepseek-r1", None, "still thinking", "still thinking", ""),
    ("qwen3", None, "a < b and </th are text", "", "a < b and </th are text"),
]


@pytest.mark.parametrize(("name", "force", "text", "reasoning", "content"), CASES)
def test_whole_output(name: str, force, text: str, reasoning: str, content: str) -> None:
    assert REASONING_PARSERS[name](force=force).parse(text) == (reasoning, content)


@pytest.mark.parametrize(("name", "force", "text", "reasoning", "content"), CASES)
def test_stream_split_at_every_position(name: str, force, text: str, reasoning: str, content: str) -> None:
    for cut in range(1, len(text)):
        p = REASONING_PARSERS[name](force=force)
        deltas = [p.feed(text[:cut]), p.feed(text[cut:]), p.finish()]
        got = ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas))
        assert got == (reasoning, content), f"split at {cut}"
        assert not any("</think>" in d.reasoning or "<think>" in d.content for d in deltas)


def test_stream_one_character_at_a_time() -> None:
    p = REASONING_PARSERS["qwen3"]()
    deltas = [p.feed(ch) for ch in "<think>abc</think>xyz"] + [p.finish()]
    assert "".join(d.reasoning for d in deltas) == "abc" and "".join(d.content for d in deltas) == "xyz"
    # the reasoning streamed as it came, not at the end
    assert deltas[7].reasoning == "a"
