"""StepInput: everything the model runner needs for one step, as plain data. It is the runner's only input
(the model never sees a Request, DESIGN.md invariant 3), and what rank 0 will broadcast to the other
tensor-parallel ranks, which is why it holds ints, lists and SamplingParams only.

    spans           one per request in the step: its row, where its new tokens start, the tokens, their slots
    table_writes    every slot-table change since the last step, in order (the spans' new slots, prefix hits,
                    rows pointed at the prefix cache's copies): the device table gets them before the forward
    sampling        one per span that samples, in span order
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from radixlm.sampling_params import SamplingParams


@dataclass
class SpanInput:
    row: int  # the request's slot-table row
    start: int  # tokens of the sequence already in the KV cache (== the first new token's position)
    token_ids: list[int]  # the new tokens computed this step
    slots: list[int]  # the KV slot of each new token
    samples: bool  # the span ends at the end of the sequence: the step samples its next token

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass
class SamplingInput:
    params: SamplingParams
    seed: int
    num_output_tokens: int  # the index of the token being sampled in the request's output
    # Read only for penalties (token counts): the request's prompt and output so far. References, valid
    # for this step only; empty when params need no penalties.
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    return_logprob: bool = False
    top_logprobs_num: int = 0


@dataclass
class StepInput:
    spans: list[SpanInput]
    table_writes: list[tuple[int, int, list[int]]] = field(default_factory=list)
    sampling: list[SamplingInput] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.spans)

    @property
    def return_logprob(self) -> bool:
        return any(s.return_logprob for s in self.sampling)

    @property
    def top_logprobs_num(self) -> int:
        return max((s.top_logprobs_num for s in self.sampling if s.return_logprob), default=0)
