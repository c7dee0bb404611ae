"""Sampling arguments: SGLang's spellings in `gen(...)` and `run(...)` -> the Engine's sampling keys.

Only what a program sets is sent; the engine applies its own defaults (and the model's
generation_config.json) to the rest. `regex` and `json_schema` are passed through as sampling keys: an
engine without constrained decoding refuses them (BackendError), one with it honours them.
"""

from __future__ import annotations

import json
from typing import Any

# run(...) / run_batch(...) keywords that set the run's sampling defaults (Engine names, as SGLang's run).
RUN_SAMPLING_KEYS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "n",
        "stop",
        "stop_token_ids",
        "stop_regex",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "ignore_eos",
        "seed",
    }
)

# gen(dtype=...) as a regex the output must match, and where it stops.
_DTYPE_REGEX: dict[str, tuple[str, list[str]]] = {
    "int": (r"[-+]?[0-9]+", [" ", "\n"]),
    "float": (r"[-+]?[0-9]*\.?[0-9]+", [" ", "\n"]),
    "bool": (r"(True|False)", []),
    "str": (r'"[^"\n]*"', []),
}


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple, str)) and len(value) == 0)


def run_defaults(sampling: dict[str, Any]) -> dict[str, Any]:
    """run()'s sampling keywords, without the unset ones (None, or an empty stop list)."""
    out = {k: v for k, v in sampling.items() if not _empty(v)}
    if "stop" in out and isinstance(out["stop"], tuple):
        out["stop"] = list(out["stop"])
    return out


def gen_sampling(
    *,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    dtype: type | str | None = None,
    regex: str | None = None,
    json_schema: str | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """gen()'s arguments as Engine sampling keys (the ones set only)."""
    keys = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": min_tokens,
        "n": n,
        "stop": [stop] if isinstance(stop, str) else stop,
        "stop_token_ids": stop_token_ids,
        "stop_regex": stop_regex,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
        "ignore_eos": ignore_eos,
        "regex": regex,
        # SGLang's json_schema is a JSON string; a dict is accepted here and sent as one.
        "json_schema": json.dumps(json_schema) if isinstance(json_schema, dict) else json_schema,
    }
    out = {k: v for k, v in keys.items() if not _empty(v)}
    if dtype is not None:
        name = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", str(dtype))
        if name not in _DTYPE_REGEX:
            raise ValueError(f"gen dtype must be one of int, float, bool, str; got {dtype!r}")
        if regex is not None:
            raise ValueError("gen takes dtype or regex, not both")
        out["regex"], extra_stop = _DTYPE_REGEX[name]
        if extra_stop:
            out["stop"] = [*out.get("stop", []), *extra_stop]
    return out
