"""Built-in chat templates, chosen by name with `--chat-template NAME` (as SGLang and vLLM users do).

A model's own template (tokenizer_config.json / chat_template.jinja) is always the better choice; these
are for checkpoints that ship none, or a base model served for chat. Each is a small Jinja template in
the conversation format its family uses; `bos_token` and `eos_token` come from the model's tokenizer.

    chatml    (alias qwen)                <|im_start|>role\\ncontent<|im_end|>       Qwen, SmolLM, many others
    llama-3   (alias llama-3-instruct)    <|start_header_id|>role<|end_header_id|>   Llama 3.x
    llama-2   (alias llama-2-chat)        [INST] <<SYS>> ... <</SYS>> ... [/INST]    Llama 2, Mistral v0.1
    gemma     (alias gemma-it)            <start_of_turn>user|model ... <end_of_turn>   Gemma 1-3
"""

from __future__ import annotations

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_LLAMA_3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# The system prompt goes inside the first user turn, as Llama 2 was trained.
_LLAMA_2 = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = '<<SYS>>\\n' + message['content'] | trim + '\\n<</SYS>>\\n\\n' %}"
    "{% elif message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + ns.system + message['content'] | trim + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% else %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# Gemma has no system role: a system message is put before the next user turn's text.
_GEMMA = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = message['content'] | trim + '\\n\\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n'"
    " + ns.system + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% set ns.system = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "llama-3": _LLAMA_3,
    "llama-2": _LLAMA_2,
    "gemma": _GEMMA,
}

# SGLang's and vLLM's names for the same formats.
CHAT_TEMPLATE_ALIASES: dict[str, str] = {
    "qwen": "chatml",
    "llama-3-instruct": "llama-3",
    "llama-2-chat": "llama-2",
    "gemma-it": "gemma",
}


def builtin_chat_template(name: str) -> str | None:
    """The built-in template called `name` (or one of its aliases), or None."""
    return BUILTIN_CHAT_TEMPLATES.get(CHAT_TEMPLATE_ALIASES.get(name, name))


def builtin_names() -> list[str]:
    return sorted([*BUILTIN_CHAT_TEMPLATES, *CHAT_TEMPLATE_ALIASES])
