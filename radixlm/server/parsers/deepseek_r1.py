"""DeepSeek-R1: its chat template opens `<think>` in the prompt, so the output is reasoning up to `</think>`
(whether or not the model writes `<think>` again), then the answer."""

from __future__ import annotations

from radixlm.server.parsers.reasoning import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek-r1"
    force = True
