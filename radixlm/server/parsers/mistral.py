"""Mistral tool calls: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (v0.3 tokenizers) or
`[TOOL_CALLS]name[ARGS]{...}` per call (newer ones)."""

from __future__ import annotations

import json
import re

from radixlm.server.parsers.tool_call import (
    ToolCall,
    ToolParser,
    arguments_json,
    call_from_object,
    decode_objects,
    held_back,
)

START, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"\s*(?:\[TOOL_CALLS\])?\s*([A-Za-z0-9_.\-]+)\[ARGS\]")


class MistralToolParser(ToolParser):
    name = "mistral"

    def find_start(self, text: str) -> int | None:
        i = text.find(START)
        return None if i < 0 else i

    def hold(self, text: str) -> int:
        return held_back(text, (START,))

    def calls(self, section: str, final: bool) -> list[ToolCall] | None:
        body = section[len(START) :]
        if body.lstrip().startswith("["):
            values, _ = decode_objects(body, 0)  # the array decodes once it is complete
            items = values[0] if values and isinstance(values[0], list) else []
            found = [c for c in (call_from_object(v) for v in items) if c is not None]
        else:
            found = self._named_calls(body)
        if final and not found:
            return None
        return found

    @staticmethod
    def _named_calls(body: str) -> list[ToolCall]:
        found, pos, decoder = [], 0, json.JSONDecoder()
        while True:
            m = _NAME.match(body, pos)
            if m is None:
                return found
            try:
                args, pos = decoder.raw_decode(body, m.end())
            except ValueError:
                return found
            found.append(ToolCall(m.group(1), arguments_json(args)))
