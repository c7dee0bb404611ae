"""The expressions a program appends to its state (`s += ...`): plain data, executed by `executor.py`.

`gen`, `select`, the role helpers and `image` in `api.py` build these; a `str` is appended as text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixlm.lang.choices import ChoicesSamplingMethod


class Expr:
    """Something a state can execute. `a + b` chains expressions (and text) into one list."""

    def __add__(self, other: Any) -> ExprList:
        return ExprList([self, _expr(other)])

    def __radd__(self, other: Any) -> ExprList:
        return ExprList([_expr(other), self])


@dataclass
class Text(Expr):
    value: str


@dataclass
class ExprList(Expr):
    items: list[Expr]

    def __add__(self, other: Any) -> ExprList:
        return ExprList([*self.items, _expr(other)])

    def __radd__(self, other: Any) -> ExprList:
        return ExprList([_expr(other), *self.items])


@dataclass
class Gen(Expr):
    name: str | None
    # Engine sampling keys (SamplingParams names) that the call sets; unset ones take the run's defaults.
    sampling: dict[str, Any] = field(default_factory=dict)
    # Logprob options of the call (Engine.generate's arguments), when set.
    logprobs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Select(Expr):
    name: str | None
    choices: list[str]
    method: ChoicesSamplingMethod


@dataclass
class RoleBegin(Expr):
    role: str


@dataclass
class RoleEnd(Expr):
    role: str


@dataclass
class Image(Expr):
    """Reserved for multimodal programs: executing one is refused until the engine takes images."""

    path: str


@dataclass
class CachePrefix(Expr):
    """Compute the state's text once, so that the branches of a fork find it in the radix cache."""


def _expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise TypeError(
        f"cannot append {type(value).__name__} to a program state (expected str or an expression)"
    )


def to_expr(value: Any) -> Expr:
    """What `s += value` executes: an expression, or a string as text (None is refused, as in SGLang)."""
    if value is None:
        raise ValueError("tried to append None to a program state")
    return _expr(value)
