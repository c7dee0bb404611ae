"""Prompt logprobs: what a forward pass returns besides the sampling logits.

A span may mark some of its rows for scoring (SpanInput.logprob_offset / logprob_targets): the logits at
prompt position p give the logprob of prompt token p + 1 given the tokens before it (SGLang's
input_token_logprobs). The LM head runs on those rows in blocks, so a long prompt never holds
[L, vocab] logits at once (a 4k-token prompt of a 152k-vocab model would be 2.4 GiB in float32).

Every tensor-parallel rank runs the same blocks (the LM head all-gathers across ranks), from the same
StepInput; only rank 0 reads the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from radixlm.model.sampler import top_token_ids
from radixlm.model.step_input import StepInput

BLOCK_ROWS = 256


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [S, V]: the rows that sample, in span order
    # The scored prompt rows, in span order, then row order (None when the step scores none):
    prompt_logprobs: torch.Tensor | None = None  # [P] float32: log_softmax at the row's target token
    prompt_top_ids: torch.Tensor | None = None  # [P, K] int64, most likely first (K: the step's largest)
    prompt_top_vals: torch.Tensor | None = None  # [P, K] float32
    pooled: torch.Tensor | None = None  # [len(step.pool_spans), D]: pooling requests' vectors, in span order


def scored_rows(step: StepInput) -> tuple[list[int], list[int], int]:
    """(packed row indices, their target ids, the largest top count) of every scored row."""
    rows: list[int] = []
    targets: list[int] = []
    top = 0
    at = 0
    for s in step.spans:
        if s.logprob_targets:
            first = at + s.logprob_offset
            rows.extend(range(first, first + len(s.logprob_targets)))
            targets.extend(s.logprob_targets)
            top = max(top, s.logprob_top)
        at += s.length
    return rows, targets, top


def score_prompt(
    compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, step: StepInput
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logprobs [P], top ids [P, K] or None, top values [P, K] or None) for the step's scored rows."""
    rows, targets, top = scored_rows(step)
    device = hidden.device
    rows_d = torch.tensor(rows, dtype=torch.int64).to(device)
    targets_d = torch.tensor(targets, dtype=torch.int64).to(device)
    lps, top_ids, top_vals = [], [], []
    for b in range(0, len(rows), BLOCK_ROWS):
        # float32 before the softmax: bf16 logits would round the logprobs of likely tokens to ~1e-2.
        logits = compute_logits(hidden[rows_d[b : b + BLOCK_ROWS]]).float()
        lp = torch.log_softmax(logits, dim=-1)
        lps.append(lp.gather(1, targets_d[b : b + BLOCK_ROWS, None]).squeeze(1))
        if top:
            ids = top_token_ids(logits, min(top, logits.shape[1]))
            top_ids.append(ids)
            top_vals.append(lp.gather(1, ids))
    if not top:
        return torch.cat(lps), None, None
    return torch.cat(lps), torch.cat(top_ids), torch.cat(top_vals)
