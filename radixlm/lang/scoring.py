"""`select`: score every choice after the prefix with prompt logprobs, in one batched call.

    prefix ids   [p0 p1 ... p9]                     tokenize(prefix)
    choice ids   [p0 p1 ... p8 q9 q10]              tokenize(prefix + choice): the boundary may merge
                                ^ start = first id that differs from the prefix's ids
    scored       logprob(q9 | ...p8), logprob(q10 | ...q9)   the tokens that spell the choice

All choices go in one generate call (max_new_tokens=0, return_logprob, logprob_start_len = the smallest
start): the engine computes the shared prefix once (the scheduler lets requests that share a prefix in
progress wait for it, and the radix cache holds it for the next call) and scores only the tail positions.
Prompts are sent as ids, so what is scored is exactly what was tokenized here.
"""

from __future__ import annotations

from radixlm.lang.backend import Backend
from radixlm.lang.choices import ChoiceScores, ChoicesDecision, ChoicesSamplingMethod


def select(
    backend: Backend, prefix: str, choices: list[str], method: ChoicesSamplingMethod
) -> ChoicesDecision:
    scores = score_choices(backend, prefix, choices, method.requires_unconditional_logprobs)
    return method(scores)


def score_choices(
    backend: Backend, prefix: str, choices: list[str], unconditional: bool = False
) -> ChoiceScores:
    if not choices:
        raise ValueError("select needs at least one choice")
    ids = backend.tokenize([prefix, *(prefix + c for c in choices)])
    prefix_ids, full = ids[0], ids[1:]
    # Position 0 has nothing before it, so it has no logprob: scoring starts at 1 at the earliest.
    starts = [max(_common_prefix_len(prefix_ids, f), 1) for f in full]
    for c, f, s in zip(choices, full, starts):
        if s >= len(f):
            raise ValueError(f"select choice {c!r} adds no token after the prefix, so it cannot be scored")
    first = min(starts)
    params = [{"max_new_tokens": 0, "temperature": 0.0}] * len(full)
    outs = backend.generate(full, params, return_logprob=True, logprob_start_len=first)
    scored = []
    for s, out in zip(starts, outs):
        entries = out["meta_info"]["input_token_logprobs"]  # prompt positions first .. the end
        scored.append([(float(lp), int(tid)) for lp, tid, *_ in entries[s - first :]])
    uncond = _unconditional(backend, full, starts) if unconditional else None
    return ChoiceScores(list(choices), scored, uncond)


def _unconditional(
    backend: Backend, full: list[list[int]], starts: list[int]
) -> list[list[tuple[float | None, int]]]:
    """Each choice's tokens scored with nothing before them (one more batched call)."""
    tails = [f[s:] for f, s in zip(full, starts)]
    params = [{"max_new_tokens": 0, "temperature": 0.0}] * len(tails)
    outs = backend.generate(tails, params, return_logprob=True, logprob_start_len=0)
    return [
        [
            (None if lp is None else float(lp), int(tid))
            for lp, tid, *_ in out["meta_info"]["input_token_logprobs"]
        ]
        for out in outs
    ]


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
