"""TokenizerManager: text <-> ids, chat templates, incremental detokenization, and stream fan-out.

It lives in the Engine's (the server's) process. The core sends token ids; each request's
`IncrementalDetokenizer` turns them into text without ever emitting half a UTF-8 character: a token that
ends mid-character decodes to U+FFFD, so its text is held back until the character is complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from radixlm.sampling_params import SamplingParams


class IncrementalDetokenizer:
    # Decoding a few tokens before the unread ones keeps word boundaries (leading spaces) right.
    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already handed to the user
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
        )

    def add(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = max(self.read_offset - self.CONTEXT_TOKENS, 0)
            self.read_offset = len(self.ids)

    def final_text(self, finish_reason: dict[str, Any] | None) -> str:
        """The whole output, with a matched stop string (and what follows it) trimmed unless no_stop_trim."""
        text = self._decode(self.ids)
        if finish_reason and finish_reason.get("type") == "stop" and not self.params.no_stop_trim:
            matched = finish_reason.get("matched")
            if isinstance(matched, str):
                cut = text.find(matched)
                if cut >= 0:
                    text = text[:cut]
            elif isinstance(matched, int) and self.ids and self.ids[-1] == matched:
                text = self._decode(self.ids[:-1])
        return text

    def take_delta(self, finished: bool, finish_reason: dict[str, Any] | None) -> str:
        """Text not yet sent. While running, the tail that could begin a stop string is held back."""
        if finished:
            text = self.final_text(finish_reason)
            delta = text[self.sent :] if len(text) >= self.sent else ""
            self.sent = max(self.sent, len(text))
            return delta
        limit = len(self.text) - self._hold if self.params.stop else len(self.text)
        if limit <= self.sent:
            return ""
        delta = self.text[self.sent : limit]
        self.sent = limit
        return delta


class TokenizerManager:
    def __init__(
        self,
        tokenizer_path: str | os.PathLike,
        *,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            str(tokenizer_path), trust_remote_code=trust_remote_code
        )
        self.chat_template = _read_chat_template(chat_template)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("this tokenizer has no chat template; pass one with --chat-template")
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        # The template already wrote any BOS it wants; encoding must not add a second one.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(self, params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, params)


def _read_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if "{" not in value and path.is_file():
        return path.read_text()
    if "{" not in value:
        raise ValueError(f"chat_template {value!r} is neither a Jinja template nor an existing file")
    return value
