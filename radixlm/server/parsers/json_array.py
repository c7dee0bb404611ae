"""The format `tool_choice: "required"` constrains the output to (tools.py builds its JSON schema): a JSON
array of `{"name": ..., "parameters": {...}}`, whatever the model's own format is; each element is a call
as soon as it is complete."""

from __future__ import annotations

from radixlm.server.parsers.tool_call import ToolCall, ToolParser, call_from_object, decode_objects


class JsonArrayToolParser(ToolParser):
    name = "json_array"

    def find_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("[") else None

    def hold(self, text: str) -> int:
        return len(text) if not text.strip() else 0

    def calls(self, section: str, final: bool) -> list[ToolCall] | None:
        values, _ = decode_objects(section, section.index("[") + 1)
        found = [c for c in (call_from_object(v, ("parameters", "arguments")) for v in values) if c is not None]
        return None if final and not found else found
