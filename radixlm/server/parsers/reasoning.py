"""Reasoning text between think markers, split from the answer, for whole outputs and text deltas.

    <think> reasoning </think> answer

`force` (DeepSeek-R1): the chat template already opened the block in the prompt, so the output starts in
reasoning whether or not it repeats `<think>`; without `force` (Qwen3) an output that does not open with
`<think>` is all answer (Qwen3 with enable_thinking=False: the template wrote an empty block itself).
A marker split across deltas is held back until it is whole, so the split never shows in the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from radixlm.server.parsers.tool_call import held_back


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    name: ClassVar[str] = ""
    start: ClassVar[str] = "<think>"
    end: ClassVar[str] = "</think>"
    force: ClassVar[bool] = False

    def __init__(self, *, force: bool | None = None) -> None:
        self.in_reasoning = self.force if force is None else force
        self._decided = False  # whether the output's start (a <think> or not) has been seen
        self._buf = ""
        self._after_end = False

    def feed(self, delta: str) -> ReasoningDelta:
        self._buf += delta
        out = ReasoningDelta()
        if not self._decided:
            stripped = self._buf.lstrip()
            if self.start.startswith(stripped) and len(stripped) < len(self.start):
                return out  # still could be "<think>"
            self._decided = True
            if stripped.startswith(self.start):
                self.in_reasoning = True
                self._buf = stripped[len(self.start) :]
        if self.in_reasoning:
            i = self._buf.find(self.end)
            if i < 0:
                keep = held_back(self._buf, (self.end,))
                out.reasoning, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
                return out
            out.reasoning = self._buf[:i]
            self._buf = self._buf[i + len(self.end) :]
            self.in_reasoning = False
            self._after_end = True
        out.content, self._buf = self._content(self._buf), ""
        return out

    def _content(self, text: str) -> str:
        # The blank lines a model writes after </think> separate, they are not part of the answer; they may
        # come in later deltas than the marker.
        if self._after_end:
            text = text.lstrip()
            self._after_end = not text
        return text

    def finish(self) -> ReasoningDelta:
        """Whatever was held back: a partial marker is text after all."""
        self._decided = True
        text, self._buf = self._buf, ""
        return ReasoningDelta(reasoning=text) if self.in_reasoning else ReasoningDelta(content=self._content(text))

    def parse(self, text: str) -> tuple[str, str]:
        """A whole output -> (reasoning, content)."""
        a, b = self.feed(text), self.finish()
        return a.reasoning + b.reasoning, a.content + b.content
