"""Whether a request's constraint (json_schema, regex, ebnf, structural_tag) compiles, checked in the front.

The core compiles every constraint against the tokenizer (core/grammar.py) and refuses one that fails, but
by then an HTTP stream may have sent its 200. This check parses the constraint with xgrammar alone (no
vocabulary: milliseconds, and memoized), so a bad schema is a ValueError naming the field before anything
is sent. xgrammar (and torch, which it imports) load on the first constrained request only.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

from radixlm.sampling_params import SamplingParams

_XGRAMMAR_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s*\S+:\d+:\s*")


def check_grammar(params: SamplingParams, model_info: Mapping[str, Any], field: str | None = None) -> None:
    """Raise ValueError naming `field` (default: sampling_params.<kind>) if the constraint cannot be used."""
    spec = params.grammar
    if spec is None:
        return
    kind, text = spec
    name = field or f"sampling_params.{kind}"
    backend = (model_info.get("runtime") or {}).get("grammar_backend", "xgrammar")
    if backend == "none":
        raise ValueError(f"{name} needs constrained decoding, which this engine was started without "
                         "(--grammar-backend none)")
    reason = compile_error(kind, text)
    if reason is not None:
        raise ValueError(f"{name} does not compile: {reason}")


@functools.lru_cache(maxsize=256)
def compile_error(kind: str, text: str) -> str | None:
    """xgrammar's reason the constraint does not parse, or None (memoized: clients repeat their schemas)."""
    import xgrammar as xgr

    try:
        if kind == "json_schema":
            xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind == "ebnf":
            xgr.Grammar.from_ebnf(text)
        else:
            _structural_tag(xgr, text)
    except Exception as exc:  # RuntimeError and xgrammar's own classes
        return " ".join(_XGRAMMAR_PREFIX.sub("", str(exc)).split()) or type(exc).__name__
    return None


def _structural_tag(xgr: Any, text: str) -> None:
    # The same two formats as core/grammar.structural_tag_grammar (SGLang's, and xgrammar's own).
    spec = json.loads(text)
    if "structures" not in spec:
        xgr.Grammar.from_structural_tag(text)
        return
    try:
        items = [
            xgr.StructuralTagItem(
                begin=s["begin"],
                schema=s["schema"] if isinstance(s["schema"], str) else json.dumps(s["schema"]),
                end=s["end"],
            )
            for s in spec["structures"]
        ]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"each of structures needs begin, schema and end ({exc})") from None
    xgr.Grammar.from_structural_tag(items, list(spec.get("triggers", [])))
