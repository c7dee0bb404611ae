"""What every tool-call format shares: the calls found, and the stream that finds them in text deltas.

A format (one file each: hermes.py, llama3_json.py, mistral.py, pythonic.py, json_array.py) says where a
tool-call section starts in the model's text and which calls a section holds so far. ToolCallStream does
the rest for streamed and whole outputs alike:

    text deltas -> content before the section (a suffix that may be the start of a marker is held back)
                -> the section: each call once it is complete, with a fresh id, as one ToolCallDelta
    finish      -> the calls left; a section that holds no call at all was not one: it is content

So a marker or a JSON object split at any point across deltas gives the same calls as the whole text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass
class ToolCallDelta:
    """One piece of a streamed tool call, shaped as OpenAI's delta.tool_calls[i]: the first piece of a
    call has its id and name; argument text may come in several pieces."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


@dataclass
class StreamDelta:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


def arguments_json(value: Any) -> str:
    """A call's arguments as JSON text (a model may write them as an object or as a string of one)."""
    if isinstance(value, str):
        try:
            json.loads(value)
            return value
        except ValueError:
            return json.dumps(value)
    return json.dumps({} if value is None else value, ensure_ascii=False)


def call_from_object(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """{"name": ..., "arguments"/"parameters": {...}} -> a ToolCall; anything else -> None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    return ToolCall(obj["name"], arguments_json(args))


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could be the start of one of `markers`."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class ToolParser:
    """A tool-call format. Subclasses set `name` and implement find_start / hold / calls."""

    name: ClassVar[str] = ""

    def find_start(self, text: str) -> int | None:
        """Where the tool-call section starts in the text so far, or None (not yet, or never)."""
        raise NotImplementedError

    def hold(self, text: str) -> int:
        """Trailing characters to keep back from content: they may become the start of a section."""
        raise NotImplementedError

    def calls(self, section: str, final: bool) -> list[ToolCall] | None:
        """The complete calls in a section so far (final: the whole output is in). None at final: the
        section is not a tool call after all."""
        raise NotImplementedError

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """A whole output -> (content, calls)."""
        s = self.stream()
        deltas = [s.feed(text), s.finish()]
        content = "".join(d.content for d in deltas)
        calls = [ToolCall(c.name or "", c.arguments) for d in deltas for c in d.calls]
        return content, calls


class ToolCallStream:
    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self._sent = 0  # characters of text sent as content
        self._section: int | None = None  # where the section starts
        self._num_calls = 0

    def feed(self, delta: str) -> StreamDelta:
        self.text += delta
        if self._section is None:
            start = self.parser.find_start(self.text)
            if start is None:
                safe = max(len(self.text) - self.parser.hold(self.text), self._sent)
                content, self._sent = self.text[self._sent : safe], safe
                return StreamDelta(content)
            self._section = start
        content = self.text[self._sent : self._section]
        self._sent = self._section
        found = self.parser.calls(self.text[self._section :], final=False) or []
        return StreamDelta(content, self._new(found))

    def finish(self) -> StreamDelta:
        if self._section is None:
            content, self._sent = self.text[self._sent :], len(self.text)
            return StreamDelta(content)
        found = self.parser.calls(self.text[self._section :], final=True)
        if found is None or (not found and not self._num_calls):
            content, self._sent = self.text[self._sent :], len(self.text)  # not a tool call after all
            return StreamDelta(content)
        return StreamDelta("", self._new(found))

    def _new(self, found: list[ToolCall]) -> list[ToolCallDelta]:
        out = []
        for call in found[self._num_calls :]:
            out.append(ToolCallDelta(self._num_calls, new_call_id(), call.name, call.arguments))
            self._num_calls += 1
        return out

    @property
    def num_calls(self) -> int:
        return self._num_calls


def decode_objects(text: str, pos: int, separators: str = " \t\r\n,;") -> tuple[list[Any], int]:
    """The complete JSON values from `pos` on, separated by `separators`; and where decoding stopped."""
    decoder = json.JSONDecoder()
    values = []
    while True:
        while pos < len(text) and text[pos] in separators:
            pos += 1
        if pos >= len(text):
            return values, pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except ValueError:
            return values, pos
        values.append(value)
        pos = end
