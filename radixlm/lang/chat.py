"""Role blocks (`system`/`user`/`assistant`) rendered through the model's own chat template.

A program's text grows as it runs, so a role block needs the template's text *before* and *after* one
message, given the messages so far. The template is rendered twice: with the history, and with the history
plus one message whose content is a marker; the new text up to the marker is the role's prefix, the rest its
suffix:

    render(history)                 = "<|im_start|>user\\nHi<|im_end|>\\n"
    render(history + [assistant ·]) = "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n·<|im_end|>\\n"
                                                                      prefix ^^^^^^^^^^^^^^^^^^^^^ ^ suffix
This takes whatever the template does (a default system prompt before the first turn, a BOS) without a
table of model families. A template that rewrites earlier turns when a new one comes is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Content no template changes or escapes (no whitespace for `trim`, no Jinja or markup characters).
_MARK = "RADIXLMLANGCONTENTMARK7f3a"


class RoleTemplate:
    def __init__(self, render: Callable[[list[dict[str, Any]]], str], strip_leading: str = "") -> None:
        """`render(messages)`: the template's text for a conversation (no generation prompt).
        `strip_leading`: text the template writes first that the tokenizer adds on its own when it encodes
        a prompt (a BOS token's text): kept out of the program's text so the prompt does not get two."""
        self._render = render
        self._strip = strip_leading

    def prefix_suffix(self, role: str, history: list[dict[str, Any]]) -> tuple[str, str]:
        before = self._render(history) if history else ""
        full = self._render([*history, {"role": role, "content": _MARK}])
        if not full.startswith(before):
            raise ValueError(
                "this chat template renders earlier messages differently once another message follows, so a "
                "program cannot append role blocks to its text; choose a template with chat_template_name"
            )
        head, found, tail = full[len(before) :].partition(_MARK)
        if not found:
            raise ValueError(f"the chat template drops the content of a {role!r} message")
        if not history and self._strip and head.startswith(self._strip):
            head = head[len(self._strip) :]
        return head, tail

    def end_of_turn(self) -> str:
        """The text that closes an assistant turn, stripped (e.g. "<|im_end|>"): a `gen` inside a role
        block stops there, as the model would end its turn. Empty when the template closes turns with
        whitespace only."""
        _, suffix = self.prefix_suffix("assistant", [{"role": "user", "content": "x"}])
        return suffix.strip()


def template_from_tokenizer(tokenizer: Any, template: str | None = None) -> RoleTemplate | None:
    """A RoleTemplate from a transformers tokenizer and its chat template (or `template`, a Jinja string,
    e.g. --chat-template's); None when there is neither."""
    jinja = template or getattr(tokenizer, "chat_template", None)
    if not jinja:
        return None

    def render(messages: list[dict[str, Any]]) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=jinja, tokenize=False, add_generation_prompt=False
        )

    bos = getattr(tokenizer, "bos_token", None) or ""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bool(bos) and bos_id is not None and tokenizer.encode("a")[:1] == [bos_id]
    return RoleTemplate(render, strip_leading=bos if adds_bos else "")


def template_from_jinja(jinja: str, bos_token: str = "", eos_token: str = "") -> RoleTemplate:
    """A RoleTemplate from a Jinja chat template alone (no tokenizer at hand): rendered in a sandbox, as
    transformers renders templates."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    compiled = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(jinja)

    def render(messages: list[dict[str, Any]]) -> str:
        return compiled.render(
            messages=messages, add_generation_prompt=False, bos_token=bos_token, eos_token=eos_token
        )

    return RoleTemplate(render)
