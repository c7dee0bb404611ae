"""`tool_choice: {"type": "function", "function": {"name": ...}}`: the grammar makes the whole output the
function's arguments, so every text delta is an arguments delta of the one call."""

from __future__ import annotations

from radixlm.server.parsers.tool_call import StreamDelta, ToolCall, ToolCallDelta, new_call_id


class NamedToolStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.text = ""
        self._started = False

    def feed(self, delta: str) -> StreamDelta:
        self.text += delta
        if not delta and self._started:
            return StreamDelta()
        first = not self._started
        self._started = True
        call = ToolCallDelta(0, new_call_id() if first else None, self.name if first else None, delta)
        return StreamDelta("", [call])

    def finish(self) -> StreamDelta:
        return self.feed("") if not self._started else StreamDelta()

    @property
    def num_calls(self) -> int:
        return 1 if self._started else 0

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        return "", [ToolCall(self.name, text)]
