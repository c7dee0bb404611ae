"""Pythonic tool calls (Llama 3.2 / 4, some Qwen fine-tunes): the output is a Python list of calls,
`[get_weather(city="Paris", days=3), now()]`, optionally inside `<|python_start|>...<|python_end|>`.
Arguments must be literals; they become JSON."""

from __future__ import annotations

import ast
import json

from radixlm.server.parsers.tool_call import ToolCall, ToolParser

OPEN, CLOSE = "<|python_start|>", "<|python_end|>"


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def find_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith("[") or stripped.startswith(OPEN):
            return len(text) - len(stripped)
        return None

    def hold(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or OPEN.startswith(stripped):
            return len(text)
        return 0

    def calls(self, section: str, final: bool) -> list[ToolCall] | None:
        body = section.strip().removeprefix(OPEN).removesuffix(CLOSE).strip()
        found = _parse_list(body) if body.endswith("]") else None
        if found is None:
            return None if final else []
        return found


def _parse_list(body: str) -> list[ToolCall] | None:
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List):
        return None
    found = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Name, ast.Attribute)) or node.args:
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        except ValueError:
            return None
        found.append(ToolCall(ast.unparse(node.func), json.dumps(args, ensure_ascii=False)))
    return found
