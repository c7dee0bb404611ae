"""Llama 3.1 / 3.2 JSON tool calls: the whole output is `{"name": ..., "parameters": {...}}` (optionally after
`<|python_tag|>`), several separated by `;`."""

from __future__ import annotations

from radixlm.server.parsers.tool_call import ToolCall, ToolParser, call_from_object, decode_objects

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3"

    def find_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        start = len(text) - len(stripped)
        if stripped.startswith("{") or stripped.startswith(PYTHON_TAG):
            return start
        return None

    def hold(self, text: str) -> int:
        # Only the output's start can open a call: hold whitespace and a partial python tag there.
        stripped = text.lstrip()
        if not stripped or PYTHON_TAG.startswith(stripped):
            return len(text)
        return 0

    def calls(self, section: str, final: bool) -> list[ToolCall] | None:
        pos = len(PYTHON_TAG) if section.startswith(PYTHON_TAG) else 0
        values, _ = decode_objects(section, pos)
        found = [c for c in (call_from_object(v, ("parameters", "arguments")) for v in values) if c is not None]
        return None if final and not found else found
