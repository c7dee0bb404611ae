"""Request: one sequence's tokens, its KV bookkeeping, its sampling state and why it finished.

The scheduling rule (DESIGN.md invariant 1): `tokens = prompt_ids + output_ids`, and the KV of
`tokens[:num_computed_tokens]` is in the pool. Each step computes a span `tokens[num_computed:num_computed+n]`;
the step samples a new token only when the span reaches the end of `tokens`.

KV ownership (invariant 2), read through the request's row of req_to_token:

    row:   [ slots 0 .. cached_len-1 | cached_len .. num_computed-1 ]
             held by the radix tree     private to this request
             (locked through last_node)
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from radixlm.messages import FinishReason
from radixlm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    return_logprob: bool = False
    top_logprobs_num: int = 0
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    # KV state, valid while RUNNING
    req_pool_idx: int | None = None
    cached_len: int = 0  # leading tokens whose slots belong to the tree
    last_node: Any = None  # the tree node locked on this request's behalf
    # reporting
    cached_tokens: int = 0  # prefix-cache hit at first admission
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    admit_order: int = 0
    num_retractions: int = 0
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens whose KV still has to be computed before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        self.status = RequestStatus.FINISHED
