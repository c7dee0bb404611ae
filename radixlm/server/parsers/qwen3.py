"""Qwen3: `<think>...</think>` when the model thinks; with `enable_thinking=False` the template writes an
empty block into the prompt and the output is all answer. The template's own choice is followed: reasoning
only when the output opens with `<think>` (or, with `thinking_opened`, when the prompt ends inside one)."""

from __future__ import annotations

from radixlm.server.parsers.reasoning import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    force = False
