"""Hermes / Qwen2.5 / Qwen3 tool calls: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one
block per call, after any content."""

from __future__ import annotations

import json
import re

from radixlm.server.parsers.tool_call import ToolCall, ToolParser, call_from_object, decode_objects, held_back

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(START) + r"(.*?)" + re.escape(END), re.DOTALL)


class HermesToolParser(ToolParser):
    name = "hermes"

    def find_start(self, text: str) -> int | None:
        i = text.find(START)
        return None if i < 0 else i

    def hold(self, text: str) -> int:
        return held_back(text, (START,))

    def calls(self, section: str, final: bool) -> list[ToolCall] | None:
        found: list[ToolCall] = []
        end = 0
        for m in _BLOCK.finditer(section):
            end = m.end()
            try:
                call = call_from_object(json.loads(m.group(1)))
            except ValueError:
                call = None  # a block that is not JSON is dropped (as vLLM and SGLang do)
            if call is not None:
                found.append(call)
        if final:
            # The model may stop (EOS) before closing its last block: a complete object there counts.
            rest = section.find(START, end)
            if rest >= 0:
                values, _ = decode_objects(section, rest + len(START))
                found += [c for c in (call_from_object(v) for v in values[:1]) if c is not None]
            if not found:
                return None
        return found
