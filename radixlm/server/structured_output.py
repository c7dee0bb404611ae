"""Other APIs' spellings of a constraint -> SamplingParams' one (json_schema, regex, ebnf, structural_tag).

    OpenAI    response_format {"type": "json_object"} | {"type": "json_schema", "json_schema": {schema, strict}}
    SGLang    regex, ebnf, json_schema, structural_tag (top level of /v1/*, or in /generate's sampling_params);
              response_format {"type": "structural_tag", "structures": [...], "triggers": [...]}
    vLLM      guided_json, guided_regex, guided_choice, guided_grammar; structured_outputs {json, regex,
              choice, grammar, json_object, structural_tag}

Each request names at most one; `Constraint.param` is the field the caller used, so a schema that does not
compile is a 400 that names it (`response_format`, `guided_json`, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from radixlm.frontend.grammar_check import check_grammar
from radixlm.sampling_params import SamplingParams
from radixlm.server.errors import APIError

# json_object: any JSON object (OpenAI's JSON mode).
ANY_OBJECT_SCHEMA = '{"type": "object"}'


@dataclass(frozen=True)
class Constraint:
    kind: str  # a SamplingParams key: json_schema, regex, ebnf, structural_tag
    value: str | dict[str, Any]
    param: str  # the request field it came from


def choice_grammar(choices: list[str]) -> str:
    """EBNF matching exactly one of the strings (vLLM's guided_choice)."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("must be a non-empty list of non-empty strings")
    # A JSON string literal is an EBNF string literal: the same escapes (\", \\, \n, ...).
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def from_extras(fields: dict[str, Any]) -> list[Constraint]:
    """The constraints in a body's SGLang / vLLM extra fields (those given, not null)."""
    out: list[Constraint] = []
    for name, kind in (("json_schema", "json_schema"), ("regex", "regex"), ("ebnf", "ebnf"),
                       ("structural_tag", "structural_tag"), ("guided_json", "json_schema"),
                       ("guided_regex", "regex"), ("guided_grammar", "ebnf")):
        value = fields.get(name)
        if value is not None:
            out.append(Constraint(kind, value, name))
    if fields.get("guided_choice") is not None:
        out.append(_choice(fields["guided_choice"], "guided_choice"))
    so = fields.get("structured_outputs")
    if so is not None:
        out.extend(from_structured_outputs(so))
    return out


def from_structured_outputs(so: dict[str, Any]) -> list[Constraint]:
    """vLLM's StructuredOutputsParams."""
    out: list[Constraint] = []
    known = {"json", "regex", "choice", "grammar", "json_object", "structural_tag",
             "disable_fallback", "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern",
             "backend", "backend_was_auto"}
    unknown = sorted(k for k, v in so.items() if k not in known and v is not None)
    if unknown:
        raise _bad(f"structured_outputs.{unknown[0]}", "is not a structured_outputs field")
    for key, kind in (("json", "json_schema"), ("regex", "regex"), ("grammar", "ebnf"),
                      ("structural_tag", "structural_tag")):
        if so.get(key) is not None:
            out.append(Constraint(kind, so[key], f"structured_outputs.{key}"))
    if so.get("choice") is not None:
        out.append(_choice(so["choice"], "structured_outputs.choice"))
    if so.get("json_object"):
        out.append(Constraint("json_schema", ANY_OBJECT_SCHEMA, "structured_outputs.json_object"))
    return out


def from_response_format(rf: Any) -> Constraint | None:
    """OpenAI's response_format (a protocol.ResponseFormat)."""
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return Constraint("json_schema", ANY_OBJECT_SCHEMA, "response_format")
    if rf.type == "json_schema":
        if rf.json_schema is None:
            raise _bad("response_format.json_schema", "is required when type is json_schema")
        schema = rf.json_schema.schema_
        # OpenAI's json_schema without a schema: any JSON object.
        return Constraint("json_schema", ANY_OBJECT_SCHEMA if schema is None else schema, "response_format")
    # SGLang's structural_tag response format: the body itself is the tag spec.
    spec = {"structures": rf.structures or [], "triggers": rf.triggers or []}
    return Constraint("structural_tag", spec, "response_format")


def one(constraints: list[Constraint]) -> Constraint | None:
    if len(constraints) > 1:
        names = ", ".join(c.param for c in constraints)
        raise _bad(constraints[1].param, f"cannot be combined with {constraints[0].param} (got {names})")
    return constraints[0] if constraints else None


def sampling_values(c: Constraint | None) -> dict[str, Any]:
    """The SamplingParams keys for a constraint."""
    return {} if c is None else {c.kind: c.value}


def check_compiles(params: SamplingParams, constraint: Constraint | None, model_info: Any) -> None:
    """A 400 naming the caller's field when the constraint does not compile (before any byte is sent)."""
    if constraint is None:
        return
    try:
        check_grammar(params, model_info, field=constraint.param)
    except ValueError as exc:
        raise APIError(400, str(exc), param=constraint.param) from exc


def _choice(value: Any, param: str) -> Constraint:
    try:
        return Constraint("ebnf", choice_grammar(value), param)
    except ValueError as exc:
        raise _bad(param, str(exc)) from None


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param} {message}", param=param)
