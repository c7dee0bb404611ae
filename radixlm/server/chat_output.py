"""One chat choice's text -> reasoning, answer and tool calls, as deltas (streamed) or at once.

    text deltas -> reasoning parser (--reasoning-parser; off with separate_reasoning=false)
                -> reasoning_content | the rest -> tool parser (per tool_choice, see tools.py) -> content | tool_calls
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixlm.server.parsers import REASONING_PARSERS, TOOL_PARSERS, JsonArrayToolParser
from radixlm.server.parsers.named import NamedToolStream
from radixlm.server.parsers.reasoning import ReasoningParser
from radixlm.server.parsers.tool_call import ToolCallDelta


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.calls)

    def merge(self, other: ChatDelta) -> ChatDelta:
        return ChatDelta(self.reasoning + other.reasoning, self.content + other.content, self.calls + other.calls)


class ChoiceOutput:
    def __init__(self, reasoning: ReasoningParser | None, tools: Any, *, stream_reasoning: bool = True) -> None:
        self.reasoning = reasoning
        self.tools = tools  # a ToolCallStream, a NamedToolStream, or None
        self.stream_reasoning = stream_reasoning
        self._held_reasoning = ""  # stream_reasoning=false: sent in one piece when the reasoning ends

    def feed(self, text: str) -> ChatDelta:
        if self.reasoning is None:
            return self._answer(text, final=False)
        r = self.reasoning.feed(text)
        return self._reasoning_out(r.reasoning, done=not self.reasoning.in_reasoning).merge(
            self._answer(r.content, final=False)
        )

    def finish(self) -> ChatDelta:
        out = ChatDelta()
        if self.reasoning is not None:
            r = self.reasoning.finish()
            out = self._reasoning_out(r.reasoning, done=True).merge(self._answer(r.content, final=False))
        return out.merge(self._answer("", final=True))

    @property
    def num_calls(self) -> int:
        return self.tools.num_calls if self.tools is not None else 0

    def _reasoning_out(self, text: str, done: bool) -> ChatDelta:
        if self.stream_reasoning:
            return ChatDelta(reasoning=text)
        self._held_reasoning += text
        if not done:
            return ChatDelta()
        text, self._held_reasoning = self._held_reasoning, ""
        return ChatDelta(reasoning=text)

    def _answer(self, text: str, final: bool) -> ChatDelta:
        if self.tools is None:
            return ChatDelta(content=text)
        d = self.tools.feed(text) if text else None
        content, calls = (d.content, list(d.calls)) if d is not None else ("", [])
        if final:
            f = self.tools.finish()
            content, calls = content + f.content, calls + f.calls
        return ChatDelta(content=content, calls=calls)


def make_choice_output(
    *,
    tool_mode: str | None,
    tool_parser: str | None,
    named_tool: str | None,
    reasoning_parser: str | None,
    separate_reasoning: bool,
    stream_reasoning: bool,
    prompt_opens_reasoning: bool,
) -> ChoiceOutput:
    reasoning = None
    if reasoning_parser and separate_reasoning:
        cls = REASONING_PARSERS[reasoning_parser]
        # A template that opened the think block in the prompt (R1, Qwen3 thinking models): the output
        # starts inside it.
        reasoning = cls(force=True) if prompt_opens_reasoning else cls()
    tools: Any = None
    if tool_mode == "required":
        tools = JsonArrayToolParser().stream()
    elif tool_mode == "named" and named_tool is not None:
        tools = NamedToolStream(named_tool)
    elif tool_mode == "auto" and tool_parser:
        tools = TOOL_PARSERS[tool_parser]().stream()
    return ChoiceOutput(reasoning, tools, stream_reasoning=stream_reasoning)
