"""Command-line flags generated from EngineConfig's fields, so that Engine(**options) and the CLI never drift."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from radixlm.config import EngineConfig


def _base_type(tp: Any) -> type:
    if isinstance(tp, str):
        tp = eval(tp, {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)})  # noqa: S307
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and (typing.get_origin(tp) in (typing.Union, types.UnionType)):
        return args[0]
    return tp


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field: model_path -> --model-path (SGLang's spelling)."""
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        # Other servers' spellings of the same flag (vLLM's --model) are accepted too.
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        help_text = f.metadata.get("help", "")
        tp = _base_type(f.type)
        if tp is bool:
            group.add_argument(*flags, dest=f.name, action="store_true", default=f.default, help=help_text)
            if "negative" in f.metadata:  # SGLang's spelling of the off switch, e.g. --disable-torch-compile
                group.add_argument(f.metadata["negative"], dest=f.name, action="store_false", help="(the opposite)")
            continue
        kwargs: dict[str, Any] = {
            "type": tp,
            "default": f.default,
            "help": f"{help_text} (default: {f.default})",
        }
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(*flags, dest=f.name, **kwargs)


def config_from_args(ns: argparse.Namespace) -> EngineConfig:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(ns, f.name)}
    return EngineConfig(**values)
