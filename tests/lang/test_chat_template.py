"""Role blocks from a chat template (no engine): prefix and suffix per role, by rendering."""

from __future__ import annotations

import pytest

from radixlm.frontend.chat_templates import builtin_chat_template
from radixlm.lang.chat import RoleTemplate, template_from_jinja


def test_chatml_roles() -> None:
    t = template_from_jinja(builtin_chat_template("chatml"))
    assert t.prefix_suffix("user", []) == ("<|im_start|>user\n", "<|im_end|>\n")
    history = [{"role": "user", "content": "Hi"}]
    assert t.prefix_suffix("assistant", history) == ("<|im_start|>assistant\n", "<|im_end|>\n")
    assert t.end_of_turn() == "<|im_end|>"


def test_a_default_system_prompt_and_the_bos_come_with_the_first_role() -> None:
    jinja = (
        "{{ bos_token }}{% if messages[0]['role'] != 'system' %}[SYS default]{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    )
    t = template_from_jinja(jinja, bos_token="<s>")
    assert t.prefix_suffix("user", []) == ("<s>[SYS default]<user>", "</user>")
    # The second turn adds only its own text.
    assert t.prefix_suffix("assistant", [{"role": "user", "content": "q"}]) == ("<assistant>", "</assistant>")
    # A tokenizer that adds its own BOS when encoding: the template's is left out of the program's text.
    stripped = RoleTemplate(t._render, strip_leading="<s>")
    assert stripped.prefix_suffix("user", []) == ("[SYS default]<user>", "</user>")


def test_a_template_that_rewrites_earlier_turns_is_refused() -> None:
    # This one marks the last message: appending a turn changes the text already written for the one before.
    t = template_from_jinja(
        "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="renders earlier messages differently"):
        t.prefix_suffix("user", [{"role": "user", "content": "a"}])


def test_a_template_that_moves_the_system_text_is_refused_by_name() -> None:
    # Llama-2 writes nothing for a system message on its own (it goes into the next user turn).
    t = template_from_jinja(builtin_chat_template("llama-2"), bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="drops the content of a 'system' message"):
        t.prefix_suffix("system", [])
    assert t.prefix_suffix("user", []) == ("<s>[INST] ", " [/INST]")
