"""Tool-call and reasoning parsers, one file per format; the server picks them by --tool-call-parser and
--reasoning-parser. The core never sees them: it sees grammars and token ids only."""

from __future__ import annotations

from radixlm.server.parsers.deepseek_r1 import DeepSeekR1ReasoningParser
from radixlm.server.parsers.hermes import HermesToolParser
from radixlm.server.parsers.json_array import JsonArrayToolParser
from radixlm.server.parsers.llama3_json import PYTHON_TAG, Llama3JsonToolParser
from radixlm.server.parsers.mistral import MistralToolParser
from radixlm.server.parsers.pythonic import PythonicToolParser
from radixlm.server.parsers.qwen3 import Qwen3ReasoningParser
from radixlm.server.parsers.reasoning import ReasoningParser
from radixlm.server.parsers.tool_call import ToolParser

# name -> parser class; other servers' names for the same format are aliases.
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen": HermesToolParser,
    "qwen25": HermesToolParser,
    "llama3": Llama3JsonToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
}
REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek-r1": DeepSeekR1ReasoningParser,
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}
__all__ = [
    "TOOL_PARSERS",
    "REASONING_PARSERS",
    "JsonArrayToolParser",
    "default_tool_parser",
    "resolve_tool_call_parser",
    "check_reasoning_parser",
]


def default_tool_parser(chat_template: str | None) -> str | None:
    """The format a chat template's tool branch writes, when exactly one format's marker is in it."""
    if not chat_template:
        return None
    found = [
        name
        for name, marker in (("hermes", "<tool_call>"), ("mistral", "[TOOL_CALLS]"), ("llama3", PYTHON_TAG))
        if marker in chat_template
    ]
    return found[0] if len(found) == 1 else None


def resolve_tool_call_parser(name: str | None, engine: object) -> str | None:
    """--tool-call-parser, checked; unset: the chat template's format when it is unambiguous."""
    if name is not None:
        if name not in TOOL_PARSERS:
            raise ValueError(f"--tool-call-parser must be one of {', '.join(TOOL_PARSERS)}, got {name!r}")
        return name
    tm = getattr(engine, "tokenizer_manager", None)
    template = getattr(tm, "chat_template", None) or getattr(getattr(tm, "tokenizer", None), "chat_template", None)
    return default_tool_parser(template if isinstance(template, str) else None)


def check_reasoning_parser(name: str | None) -> str | None:
    if name is not None and name not in REASONING_PARSERS:
        raise ValueError(f"--reasoning-parser must be one of {', '.join(REASONING_PARSERS)}, got {name!r}")
    return name
