"""tool_choice -> the grammar that enforces it, and the parser that reads the calls back.

    auto       no grammar: the model may answer or call; --tool-call-parser (or the chat template's own
               format) finds the calls in its text
    required   the output is a JSON array of {"name": <one of the tools>, "parameters": <its schema>}, at
               least one (exactly one without parallel_tool_calls): valid calls whatever the weights
    named      the output is the named function's arguments, valid under its parameters schema
    none       no grammar, no parsing: the text is the answer
"""

from __future__ import annotations

from typing import Any

from radixlm.server.structured_output import Constraint

# A function without a parameters schema takes any JSON object.
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _parameters(tool: Any) -> dict[str, Any]:
    return tool.function.parameters or _ANY_OBJECT


def required_schema(tools: list[Any], parallel: bool) -> dict[str, Any]:
    """One or more calls, each {"name": const, "parameters": that function's schema}."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def tool_constraint(req: Any) -> Constraint | None:
    """The constraint a chat request's tool_choice needs (None for auto and none)."""
    mode = req.tool_mode
    if mode == "required":
        parallel = req.parallel_tool_calls is not False
        return Constraint("json_schema", required_schema(req.tools, parallel), "tool_choice")
    if mode == "named":
        name = req.tool_choice.function.name
        tool = next(t for t in req.tools if t.function.name == name)
        return Constraint("json_schema", _parameters(tool), "tools")
    return None
