"""The primitives a program appends: gen, select, roles, image (SGLang's names and arguments)."""

from __future__ import annotations

from typing import Any

from radixlm.lang import ir
from radixlm.lang.choices import ChoicesSamplingMethod, token_length_normalized
from radixlm.lang.defaults import resolve_backend
from radixlm.lang.sampling import gen_sampling


def gen(
    name: str | None = None,
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
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    dtype: type | str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    regex: str | None = None,
    json_schema: str | dict[str, Any] | None = None,
) -> ir.Expr:
    """Generate into the variable `name`. With `choices`, this is `select`."""
    if choices:
        return select(name, choices, temperature or 0.0, choices_method or token_length_normalized)
    logprobs: dict[str, Any] = {}
    if return_logprob:
        logprobs = {
            "return_logprob": True,
            "logprob_start_len": -1 if logprob_start_len is None else logprob_start_len,
            "top_logprobs_num": top_logprobs_num or 0,
        }
    sampling = gen_sampling(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        n=n,
        stop=stop,
        stop_token_ids=stop_token_ids,
        stop_regex=stop_regex,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
        dtype=dtype,
        regex=regex,
        json_schema=json_schema,
    )
    return ir.Gen(name, sampling, logprobs)


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod = token_length_normalized,
) -> ir.Expr:
    """Append the choice the model finds likeliest after the text so far (scored, not sampled)."""
    if not choices:
        raise ValueError("select needs a non-empty list of choices")
    if temperature > 1e-5:
        raise ValueError("select scores choices by logprob; a sampling temperature has no meaning for it")
    return ir.Select(name, [str(c) for c in choices], choices_method)


def _role(role: str, expr: Any = None) -> ir.Expr:
    if expr is None:
        return ir.ExprList([ir.RoleBegin(role), ir.RoleEnd(role)])
    return ir.ExprList([ir.RoleBegin(role), ir.to_expr(expr), ir.RoleEnd(role)])


def system(expr: Any = None) -> ir.Expr:
    return _role("system", expr)


def user(expr: Any = None) -> ir.Expr:
    return _role("user", expr)


def assistant(expr: Any = None) -> ir.Expr:
    return _role("assistant", expr)


def system_begin() -> ir.Expr:
    return ir.RoleBegin("system")


def system_end() -> ir.Expr:
    return ir.RoleEnd("system")


def user_begin() -> ir.Expr:
    return ir.RoleBegin("user")


def user_end() -> ir.Expr:
    return ir.RoleEnd("user")


def assistant_begin() -> ir.Expr:
    return ir.RoleBegin("assistant")


def assistant_end() -> ir.Expr:
    return ir.RoleEnd("assistant")


def image(path: str) -> ir.Expr:
    """Reserved: multimodal programs. Executing it raises until the engine takes images."""
    return ir.Image(str(path))


def flush_cache(backend: Any = None) -> bool:
    return resolve_backend(backend).flush_cache()


def get_server_info(backend: Any = None) -> dict[str, Any]:
    return resolve_backend(backend).get_server_info()
