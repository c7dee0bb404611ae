"""SamplingParams: the user-facing sampling options, and every check on them.

This is the one place where sampling input is validated (DESIGN.md invariant 5): the engine, the
offline API and the HTTP server all build a SamplingParams, so a bad value is rejected here with a
ValueError that names the field, and nothing downstream needs to re-check it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Temperatures below this are treated as greedy: dividing logits by a near-zero temperature overflows
# float32 to inf and softmax turns that into NaN, while the limit of such a distribution is the argmax.
GREEDY_TEMPERATURE_EPS = 1e-6

# The constraint keys a request may give (at most one), in the order SamplingParams.grammar reads them.
GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "structural_tag")


# Every integer crosses to the core as msgpack, which holds 64 bits: a larger one would fail there, far
# from the caller, so it is refused here with the field's name.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

# Error messages echo what the caller sent, clipped: a 1 MB stop string must not make a 1 MB error.
_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = 80
_ECHO.maxlist = _ECHO.maxtuple = 6


def short_repr(value: Any) -> str:
    """repr() for error messages, with long strings, lists and numbers clipped."""
    return _ECHO.repr(value)


def _field_error(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"sampling_params.{name} must be {expected}, got {short_repr(value)}")


def _as_int(name: str, value: Any, expected: str) -> int:
    # bool is a subclass of int in Python; `max_new_tokens=True` is a bug in the caller, not a 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _field_error(name, expected, value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise _field_error(name, f"{expected}, within 64 bits", value)
    return int(value)


def is_valid_text(s: str) -> bool:
    """False for a str holding a lone surrogate (JSON allows "\\ud800"; UTF-8, msgpack and tokenizers don't)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_float(name: str, value: Any, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _field_error(name, expected, value)
    value = float(value)
    if not math.isfinite(value):
        raise _field_error(name, expected, value)
    return value


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _field_error(name, "a bool", value)
    return value


@dataclass
class SamplingParams:
    """How to sample one request. Validated and normalized in ``__post_init__``; not mutated after."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = -1  # -1 (or 0) disables; else >= 1
    min_p: float = 0.0  # [0, 1]
    # transformers' RepetitionPenaltyLogitsProcessor over the unique prompt + output tokens.
    repetition_penalty: float = 1.0
    # OpenAI semantics over OUTPUT tokens only: logit -= frequency * count + presence * (count > 0).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # a single str is accepted and becomes [str]
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    # OpenAI's: token id -> a value in [-100, 100] added to that token's logit before sampling (and before
    # a greedy argmax). JSON keys are strings, so decimal-string ids are accepted and become ints.
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Constrained decoding (SGLang's keys; at most one): a JSON schema (a str of JSON, or a dict/bool that
    # becomes one), a regular expression, an EBNF grammar, or an xgrammar structural tag (JSON). The core
    # compiles it (core/grammar.py) and the sampler masks every token the grammar does not allow.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        self.max_new_tokens = _as_int("max_new_tokens", self.max_new_tokens, "an int >= 0")
        if self.max_new_tokens < 0:
            raise _field_error("max_new_tokens", "an int >= 0", self.max_new_tokens)

        expected = f"an int in [0, max_new_tokens={self.max_new_tokens}]"
        self.min_new_tokens = _as_int("min_new_tokens", self.min_new_tokens, expected)
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise _field_error("min_new_tokens", expected, self.min_new_tokens)

        expected = "a finite float >= 0 (0 means greedy)"
        self.temperature = _as_float("temperature", self.temperature, expected)
        if self.temperature < 0:
            raise _field_error("temperature", expected, self.temperature)

        self.top_p = _as_float("top_p", self.top_p, "in (0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise _field_error("top_p", "in (0, 1]", self.top_p)

        expected = "an int: -1 or 0 to disable, else >= 1"
        self.top_k = _as_int("top_k", self.top_k, expected)
        if self.top_k < -1:
            raise _field_error("top_k", expected, self.top_k)
        if self.top_k == 0:
            self.top_k = -1  # one spelling of "disabled" downstream

        self.min_p = _as_float("min_p", self.min_p, "in [0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise _field_error("min_p", "in [0, 1]", self.min_p)

        expected = "a finite float > 0 (1 disables)"
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty, expected)
        if self.repetition_penalty <= 0:
            raise _field_error("repetition_penalty", expected, self.repetition_penalty)

        for name in ("frequency_penalty", "presence_penalty"):
            value = _as_float(name, getattr(self, name), "in [-2, 2]")
            if not -2.0 <= value <= 2.0:
                raise _field_error(name, "in [-2, 2]", value)
            setattr(self, name, value)

        self.stop = self._check_stop(self.stop)
        self.stop_token_ids = self._check_stop_token_ids(self.stop_token_ids)

        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            setattr(self, name, _as_bool(name, getattr(self, name)))

        self.n = _as_int("n", self.n, "an int >= 1")
        if self.n < 1:
            raise _field_error("n", "an int >= 1", self.n)

        if self.seed is not None:
            # Any 64-bit int is a valid seed (the sampler folds seed + sample index into 64 bits).
            self.seed = _as_int("seed", self.seed, "an int or None")

        self.logit_bias = self._check_logit_bias(self.logit_bias)
        self._check_grammar()

    def _check_grammar(self) -> None:
        given = [name for name in GRAMMAR_KINDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(
                f"sampling_params.{given[1]} cannot be combined with sampling_params.{given[0]}: "
                "give one constraint per request"
            )
        for name in ("json_schema", "structural_tag"):
            value = getattr(self, name)
            if isinstance(value, Mapping) or (name == "json_schema" and isinstance(value, bool)):
                # Key order is kept: a schema's property order is the order the output writes them in.
                setattr(self, name, json.dumps(value, ensure_ascii=False))
            elif isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except ValueError as exc:
                    raise _field_error(name, f"valid JSON ({exc})", value) from None
                if not isinstance(parsed, dict) and not (name == "json_schema" and isinstance(parsed, bool)):
                    raise _field_error(name, "a JSON object", value)
            elif value is not None:
                raise _field_error(name, "a JSON object or a string of one", value)
        for name in ("regex", "ebnf"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _field_error(name, "a non-empty str", value)
        for name in given:
            if not is_valid_text(getattr(self, name)):
                raise _field_error(name, "valid Unicode text (no lone surrogates)", getattr(self, name))

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(kind, text) of the request's constraint, or None: also the key compiled grammars are cached by."""
        for name in GRAMMAR_KINDS:
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    @staticmethod
    def _check_stop(stop: Any) -> list[str]:
        expected = "a non-empty str or a list of non-empty str"
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise _field_error("stop", expected, stop)
        for s in stop:
            # An empty stop string would match at every position and end the request at once.
            if not isinstance(s, str) or not s:
                raise _field_error("stop", expected, stop)
            if not is_valid_text(s):
                raise _field_error("stop", "valid Unicode text (no lone surrogates)", s)
        return list(stop)

    @staticmethod
    def _check_stop_token_ids(ids: Any) -> list[int]:
        expected = "a list of ints >= 0, within 64 bits"
        if not isinstance(ids, (list, tuple)):
            raise _field_error("stop_token_ids", expected, ids)
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i <= INT64_MAX:
                raise _field_error("stop_token_ids", expected, ids)
            out.append(int(i))
        return out

    @staticmethod
    def _check_logit_bias(bias: Any) -> dict[int, float]:
        # Token ids are checked against the vocabulary where it is known (the front's prompt checks).
        expected = "a map of token id (an int >= 0, or its decimal string) to a bias in [-100, 100]"
        if not isinstance(bias, Mapping):
            raise _field_error("logit_bias", expected, bias)
        out: dict[int, float] = {}
        for key, value in bias.items():
            token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
            if (
                isinstance(token, bool)
                or not isinstance(token, numbers.Integral)
                or not 0 <= token <= INT64_MAX
            ):
                raise _field_error("logit_bias", expected, {key: value})
            v = _as_float("logit_bias", value, expected)
            if not -100.0 <= v <= 100.0:
                raise _field_error("logit_bias", expected, {key: value})
            out[int(token)] = v
        return out

    @classmethod
    def from_any(cls, obj: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
        """None -> defaults; a SamplingParams -> itself; a mapping -> validated (unknown keys rejected)."""
        if obj is None:
            return cls()
        if isinstance(obj, SamplingParams):
            return obj
        if not isinstance(obj, Mapping):
            raise ValueError(
                f"sampling_params must be a dict, a SamplingParams or None, got {type(obj).__name__}"
            )
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in obj if k not in valid]
        if unknown:
            # Silently dropping an option would sample differently from what the user asked for.
            raise ValueError(
                f"unknown sampling_params key(s) {', '.join(short_repr(k) for k in unknown[:5])}; "
                f"valid keys are: {', '.join(valid)}"
            )
        return cls(**obj)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_greedy(self) -> bool:
        # top_k == 1 keeps only the most likely token, which is exactly the argmax.
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether sampling reads the tokens so far (repetition, frequency or presence penalty)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
