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
from dataclasses import dataclass, field
from typing import Any

from radixlm.frontend.grammar_check import check_grammar
from radixlm.sampling_params import SamplingParams, is_valid_text, short_repr

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class PromptGroup:
    """One prompt and its n samples: `rids[k]` names sample k (the core seeds it with seed + k)."""

    index: int  # the prompt's position in the call
    input_ids: list[int]
    params: SamplingParams
    rids: list[str]
    images: list[dict[str, Any]] = field(default_factory=list)  # messages.AddRequest.images (multimodal.py)


@dataclass(frozen=True)
class PreparedCall:
    groups: list[PromptGroup]
    single: bool  # one prompt given as a plain string / id list, with n == 1: the call returns a dict
    return_logprob: bool
    top_logprobs_num: int
    logprob_start_len: int = -1  # prompt logprobs from this position (-1: none; only with return_logprob)

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
    max_n: int | None = None,
    max_chars_per_token: int | None = None,
    logprob_start_len: Any = -1,
) -> PreparedCall:
    """Check and normalize everything a generate call was given; raises ValueError naming what is wrong.

    max_n: the most samples a prompt may ask for. max_chars_per_token: a bound on how many characters one
    token covers (TokenizerManager.max_chars_per_token), so that a text far beyond the context length is
    refused before it is tokenized."""

    def checked_encode(text: str) -> list[int]:
        if max_chars_per_token is not None:
            check_prompt_chars(len(text), model_info, max_chars_per_token)
        if not is_valid_text(text):
            raise ValueError(
                "the prompt holds a lone surrogate (an unpaired \\ud800-\\udfff): not valid text"
            )
        return encode(text)

    ids_list, single = _prompts(prompt, input_ids, checked_encode)
    params = _sampling_params(sampling_params, len(ids_list))
    if max_n is not None:  # before anything loops over the samples (their request ids)
        for p in params:
            if p.n > max_n:
                raise ValueError(
                    f"sampling_params.n is {short_repr(p.n)}; at most {max_n} samples per prompt"
                )
    for ids in ids_list:
        check_prompt_ids(ids, model_info)
    check_logprob_args(return_logprob, top_logprobs_num)
    check_logprob_start_len(logprob_start_len, ids_list if return_logprob else [])
    for p in params:
        check_logit_bias(p, model_info)
        check_grammar(p, model_info)
    counts = [p.n for p in params]
    rids = _rids(rid, sum(counts), in_use)
    groups, start = [], 0
    for i, (ids, p) in enumerate(zip(ids_list, params)):
        groups.append(PromptGroup(i, list(ids), p, rids[start : start + p.n]))
        start += p.n
    start_len = logprob_start_len if return_logprob else -1  # SGLang's: without return_logprob, no effect
    return PreparedCall(groups, single and params[0].n == 1, return_logprob, top_logprobs_num, start_len)


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
    if len(ids) >= ctx:  # before the loop over the ids: a huge prompt is refused at once
        raise ValueError(
            f"the prompt has {len(ids)} tokens; the context length is {ctx}, leaving no room for output"
        )
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ValueError(f"input_ids holds {short_repr(t)}, outside the vocabulary [0, {vocab})")
    capacity = model_info.get("kv_capacity")
    if capacity is not None and len(ids) + 1 > capacity:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, but the KV cache holds {capacity} tokens in all and a "
            f"request needs its prompt plus one output token ({len(ids) + 1}); raise max_total_tokens "
            f"(or mem_fraction_static), or shorten the prompt"
        )


def check_prompt_chars(chars: int, model_info: Mapping[str, Any], max_chars_per_token: int | None) -> None:
    """Refuse a text that cannot fit the context before tokenizing it: tokenizing 10 MB takes tens of
    seconds. No token covers more than `max_chars_per_token` characters, so a text longer than the context
    times that is too long for certain. None: no bound known, no check."""
    if max_chars_per_token is None:
        return
    ctx = model_info["context_length"]
    limit = ctx * max_chars_per_token
    if chars > limit:
        raise ValueError(
            f"the prompt has {chars} characters, more than a context length of {ctx} tokens can hold "
            f"(at most {limit} characters with this tokenizer); shorten the prompt"
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


def check_logprob_start_len(k: Any, ids_list: list[list[int]]) -> None:
    """SGLang's logprob_start_len: prompt logprobs for positions k..len-1; -1 for none. `ids_list`: the
    prompts it applies to (none without return_logprob, where it has no effect)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < -1:
        raise ValueError(
            f"logprob_start_len must be an int >= -1 (-1: no prompt logprobs), got {short_repr(k)}"
        )
    shortest = min((len(ids) for ids in ids_list), default=None)
    if shortest is not None and k >= shortest:
        raise ValueError(
            f"logprob_start_len is {k}, but a prompt has only {shortest} tokens: it must be smaller than "
            "the prompt's length"
        )


def check_logit_bias(params: SamplingParams, model_info: Mapping[str, Any]) -> None:
    vocab = model_info["vocab_size"]
    if params.logit_bias and max(params.logit_bias) >= vocab:
        raise ValueError(
            f"sampling_params.logit_bias holds token id {max(params.logit_bias)}, outside the vocabulary "
            f"[0, {vocab})"
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
            f"non-empty strings (one per prompt and sample), got {short_repr(rid)}"
        )
    if len(set(rids)) != len(rids):
        raise ValueError(f"rid holds the same id more than once: {short_repr(rids)}")
    if not all(is_valid_text(r) for r in rids):
        raise ValueError("rid holds a lone surrogate (an unpaired \\ud800-\\udfff): not valid text")
    taken = [r for r in rids if in_use(r)]
    if taken:
        raise ValueError(f"request id(s) {short_repr(taken)} are already in use")
    return list(rids)


def chat_conversations(messages: Any) -> tuple[list[list[dict[str, Any]]], bool]:
    """Engine.chat's `messages`: one conversation (a list of message dicts) or a list of them ->
    (conversations, whether one was given). Each message needs a string `role`; the template reads the
    rest (`content`, `name`, ...)."""
    expected = (
        'a conversation (a non-empty list of {"role": ..., "content": ...} dicts) or a non-empty list of '
        "conversations"
    )
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be {expected}, got {short_repr(messages)}")
    single = isinstance(messages[0], dict)
    conversations = [messages] if single else messages
    for i, conv in enumerate(conversations):
        where = "messages" if single else f"messages[{i}]"
        if not isinstance(conv, list) or not conv:
            raise ValueError(f"{where} must be a non-empty list of message dicts, got {short_repr(conv)}")
        for j, msg in enumerate(conv):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise ValueError(f'{where}[{j}] must be a dict with a string "role", got {short_repr(msg)}')
    return conversations, single


def check_task(model_info: Mapping[str, Any], call: str) -> None:
    """`generate` needs a generating model, `encode` a pooling one (ModelInfo.task): a clear ValueError
    (a 400 over HTTP) instead of a request the core would refuse."""
    task = model_info.get("task", "generate")
    arch = model_info.get("architecture", "the model")
    if call == "encode" and task == "generate":
        raise ValueError(
            f"encode needs an embedding or classification model; {arch} is a generative model (task 'generate')"
        )
    if call == "generate" and task != "generate":
        raise ValueError(f"{arch} is a pooling model (task {task!r}): it cannot generate text; use encode")
