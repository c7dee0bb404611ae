"""A generate call's inputs -> prompt groups ready for the core: normalization, n, rids, and every prompt
check, here and nowhere else in the front (DESIGN.md invariant 6: validate at the edge, once).

    prompt="Hi" | ["a", "b"]        -> encoded with the tokenizer
    input_ids=[1, 2] | [[1], [2]]   -> taken as they are
    sampling_params: one for all prompts, or a list with one per prompt
    -> one PromptGroup per prompt: its ids, its SamplingParams and its n request ids (one AddRequest each)

A prompt is checked against what the core reported at start (ModelInfo): not empty, every id inside the
vocabulary, shorter than the context length, and small enough for the KV pool to hold it plus one output
token. The core would refuse the last with an abort; here it is a ValueError naming the numbers before
anything is sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from radixlm.sampling_params import SamplingParams

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class PromptGroup:
    """One prompt and its n samples: `rids[k]` names sample k (the core seeds it with seed + k)."""

    index: int  # the prompt's position in the call
    input_ids: list[int]
    params: SamplingParams
    rids: list[str]


@dataclass(frozen=True)
class PreparedCall:
    groups: list[PromptGroup]
    single: bool  # one prompt given as a plain string / id list, with n == 1: the call returns a dict
    return_logprob: bool
    top_logprobs_num: int

    @property
    def rids(self) -> list[str]:
        """Every request id, prompt-major (p0 s0, p0 s1, p1 s0, ...): the order results come back in."""
        return [r for g in self.groups for r in g.rids]


def prepare_call(
    prompt: Any,
    input_ids: Any,
    sampling_params: Any,
    rid: Any,
    return_logprob: Any,
    top_logprobs_num: Any,
    *,
    encode: Callable[[str], list[int]],
    model_info: Mapping[str, Any],
    in_use: Callable[[str], bool],
) -> PreparedCall:
    """Check and normalize everything a generate call was given; raises ValueError naming what is wrong."""
    ids_list, single = _prompts(prompt, input_ids, encode)
    params = _sampling_params(sampling_params, len(ids_list))
    for ids in ids_list:
        check_prompt_ids(ids, model_info)
    check_logprob_args(return_logprob, top_logprobs_num)
    counts = [p.n for p in params]
    rids = _rids(rid, sum(counts), in_use)
    groups, start = [], 0
    for i, (ids, p) in enumerate(zip(ids_list, params)):
        groups.append(PromptGroup(i, list(ids), p, rids[start : start + p.n]))
        start += p.n
    return PreparedCall(groups, single and params[0].n == 1, return_logprob, top_logprobs_num)


def _prompts(prompt: Any, input_ids: Any, encode: Callable[[str], list[int]]) -> tuple[list[list[int]], bool]:
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt or input_ids")
    if prompt is not None:
        single = isinstance(prompt, str)
        prompts = [prompt] if single else prompt
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a list of strings")
        ids_list = [encode(p) for p in prompts]
    else:
        single = (
            isinstance(input_ids, list) and bool(input_ids) and all(isinstance(t, int) for t in input_ids)
        )
        ids_list = [input_ids] if single else input_ids
        if not isinstance(ids_list, list) or not all(isinstance(x, list) for x in ids_list):
            raise ValueError("input_ids must be a list of token ids or a list of such lists")
    if not ids_list:
        raise ValueError("no prompts given")
    return ids_list, single


def _sampling_params(sampling_params: Any, num_prompts: int) -> list[SamplingParams]:
    if isinstance(sampling_params, list):
        if len(sampling_params) != num_prompts:
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {num_prompts} prompts")
        return [SamplingParams.from_any(p) for p in sampling_params]
    return [SamplingParams.from_any(sampling_params)] * num_prompts


def check_prompt_ids(ids: list[int], model_info: Mapping[str, Any]) -> None:
    """Every check on a prompt's token ids, against the loaded model and the resolved KV pool."""
    vocab, ctx = model_info["vocab_size"], model_info["context_length"]
    if not ids:
        raise ValueError("the prompt is empty: it must hold at least one token")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ValueError(f"input_ids holds {t!r}, outside the vocabulary [0, {vocab})")
    if len(ids) >= ctx:
        raise ValueError(
            f"the prompt has {len(ids)} tokens; the context length is {ctx}, leaving no room for output"
        )
    capacity = model_info.get("kv_capacity")
    if capacity is not None and len(ids) + 1 > capacity:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, but the KV cache holds {capacity} tokens in all and a "
            f"request needs its prompt plus one output token ({len(ids) + 1}); raise max_total_tokens "
            f"(or mem_fraction_static), or shorten the prompt"
        )


def check_logprob_args(return_logprob: Any, top_logprobs_num: Any) -> None:
    if not isinstance(return_logprob, bool):
        raise ValueError(f"return_logprob must be a bool, got {return_logprob!r}")
    if (
        isinstance(top_logprobs_num, bool)
        or not isinstance(top_logprobs_num, int)
        or not 0 <= top_logprobs_num <= MAX_TOP_LOGPROBS
    ):
        raise ValueError(
            f"top_logprobs_num must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs_num!r}"
        )


def _rids(rid: Any, count: int, in_use: Callable[[str], bool]) -> list[str]:
    """`count` request ids: fresh random ones, or the caller's (a string for one request, else a list of
    one per prompt and sample, prompt-major)."""
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    rids = [rid] if isinstance(rid, str) else rid
    if not isinstance(rids, list) or len(rids) != count or not all(isinstance(r, str) and r for r in rids):
        raise ValueError(
            f"rid must be a non-empty string for one request, or a list of {count} "
            f"non-empty strings (one per prompt and sample), got {rid!r}"
        )
    if len(set(rids)) != len(rids):
        raise ValueError(f"rid holds the same id more than once: {rids}")
    taken = [r for r in rids if in_use(r)]
    if taken:
        raise ValueError(f"request id(s) {taken} are already in use")
    return list(rids)
