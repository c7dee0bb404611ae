"""Built-in chat templates by name (--chat-template chatml, llama-3, ...), rendered by the tokenizer."""

from __future__ import annotations

import pytest

from radixlm.frontend.chat_templates import BUILTIN_CHAT_TEMPLATES, CHAT_TEMPLATE_ALIASES
from radixlm.frontend.tokenizer_manager import TokenizerManager
from radixlm.testing import cached_model_folder

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]

EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama-3": "{bos}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama-2": "{bos}[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. {eos}{bos}[INST] Bye [/INST]",
    "gemma": "{bos}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
}


@pytest.mark.parametrize("name", sorted(BUILTIN_CHAT_TEMPLATES) + sorted(CHAT_TEMPLATE_ALIASES))
def test_builtin_template_by_name(name: str) -> None:
    tm = TokenizerManager(cached_model_folder("qwen2"), chat_template=name)
    tok = tm.tokenizer
    expected = EXPECTED[CHAT_TEMPLATE_ALIASES.get(name, name)].format(
        bos=tok.bos_token or "", eos=tok.eos_token or ""
    )
    text = tok.decode(tm.apply_chat_template(CONVERSATION), skip_special_tokens=False)
    assert text == expected


def test_unknown_name_lists_the_builtin_ones() -> None:
    with pytest.raises(ValueError, match="chatml"):
        TokenizerManager(cached_model_folder("qwen2"), chat_template="no-such-template")
