"""StepInput: everything the model runner needs for one step, as plain data. It is the runner's only input
(the model never sees a Request, DESIGN.md invariant 3), and what rank 0 will broadcast to the other
tensor-parallel ranks, which is why it holds ints, lists and SamplingParams only.

    spans           one per request in the step: its row, where its new tokens start, the tokens, their slots,
                    and the rows whose prompt logprobs are scored (logprob_offset, logprob_targets)
    table_writes    every slot-table change since the last step, in order (the spans' new slots, prefix hits,
                    rows pointed at the prefix cache's copies): the device table gets them before the forward
    sampling        one per span that samples, in span order
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from radixlm.sampling_params import SamplingParams


@dataclass
class SpanInput:
    row: int  # the request's slot-table row
    start: int  # tokens of the sequence already in the KV cache (== the first new token's position)
    token_ids: list[int]  # the new tokens computed this step
    slots: list[int]  # the KV slot of each new token
    samples: bool  # the span ends at the end of the sequence: the step samples its next token
    # Prompt logprobs: the span's tokens logprob_offset, logprob_offset + 1, ... are scored, each against
    # the prompt token after it (logprob_targets; the last may lie in the next chunk, which the scheduler
    # knows). Empty: nothing scored. logprob_top: how many top alternatives each scored row reports.
    logprob_offset: int = 0
    logprob_targets: list[int] = field(default_factory=list)
    logprob_top: int = 0
    # The request's images whose placeholder positions overlap this span (messages.AddRequest.images):
    # the runner embeds their features there. Empty for text.
    images: list[dict[str, Any]] = field(default_factory=list)
    # M-RoPE: the request's (prompt position rows, delta) (core/request.Request.mrope), on every span of it.
    mrope: tuple[list[list[int]], int] | None = None

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
    # Constrained decoding: the sampling rows (indices into `sampling`) that a grammar constrains, and the
    # token bitmask, int32 [len(sampling), ceil(V / 32)] (bit t of a constrained row set: token t allowed;
    # other rows unread). A tensor in the core's process, little-endian bytes on the wire to the other
    # tensor-parallel ranks.
    grammar_rows: list[int] = field(default_factory=list)
    grammar_bitmask: Any = None
    # Pooling requests (encode): the spans, each a whole prompt, whose hidden states are pooled
    pool_spans: list[int] = field(default_factory=list)
    # What the scheduler knows for the whole step, so the runner skips per-span and per-row checks (False
    # is always safe: the checks run). text_only: no span has images, M-RoPE rows, prompt logprobs or
    # pooling. plain_greedy: every sampling row takes the argmax of its raw logits (greedy; no penalties,
    # logit_bias, min_new_tokens, grammar or logprobs).
    text_only: bool = False
    plain_greedy: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.spans)

    @property
    def return_logprob(self) -> bool:
        return not self.plain_greedy and any(s.return_logprob for s in self.sampling)

    @property
    def scores_prompt(self) -> bool:
        """Some span asks for prompt logprobs."""
        return not self.text_only and any(s.logprob_targets for s in self.spans)

    @property
    def top_logprobs_num(self) -> int:
        if self.plain_greedy:
            return 0
        return max((s.top_logprobs_num for s in self.sampling if s.return_logprob), default=0)


# ---- the wire form: what rank 0 sends the other tensor-parallel ranks each step ----------------------
# Plain lists of ints, bools and a dict per sampling row, so msgpack carries them (never pickle). Sampling
# params travel as their full dict; every rank rebuilds the same SamplingParams and samples the same way.


def _int64(value: int) -> int:
    """Fold a Python int into int64 (two's complement), as the sampler's hash does: msgpack stops at 64 bits."""
    return ((int(value) + (1 << 63)) % (1 << 64)) - (1 << 63)


def _params_to_wire(params: SamplingParams) -> dict:
    d = params.to_dict()
    if d.get("seed") is not None:
        d["seed"] = _int64(d["seed"])
    # msgpack maps with int keys need strict_map_key=False on the reader; pairs need nothing.
    d["logit_bias"] = [[t, v] for t, v in d.get("logit_bias", {}).items()]
    return d


def _params_from_wire(d: dict) -> SamplingParams:
    return SamplingParams(**{**d, "logit_bias": {int(t): v for t, v in d.get("logit_bias", [])}})


def step_to_wire(step: StepInput) -> list:
    return [
        [
            [
                s.row,
                s.start,
                s.token_ids,
                s.slots,
                s.samples,
                s.logprob_offset,
                s.logprob_targets,
                s.logprob_top,
                s.images,
            ]
            for s in step.spans
        ],
        [[row, start, slots] for row, start, slots in step.table_writes],
        [
            [
                _params_to_wire(x.params),
                _int64(x.seed),
                x.num_output_tokens,
                list(x.prompt_ids),
                list(x.output_ids),
                x.return_logprob,
                x.top_logprobs_num,
            ]
            for x in step.sampling
        ],
        [step.grammar_rows, _mask_bytes(step.grammar_bitmask)],
        step.pool_spans,
        [step.text_only, step.plain_greedy],
    ]


def _mask_bytes(mask: Any) -> bytes | None:
    if mask is None or isinstance(mask, bytes):
        return mask
    return mask.contiguous().numpy().tobytes()  # a CPU int32 tensor (the core fills it on the host)


def step_from_wire(data: list) -> StepInput:
    spans, writes, sampling, (grammar_rows, grammar_bitmask), pool_spans, (text_only, plain_greedy) = data
    return StepInput(
        spans=[SpanInput(*span) for span in spans],
        table_writes=[(row, start, slots) for row, start, slots in writes],
        sampling=[
            SamplingInput(_params_from_wire(params), seed, n, prompt, output, lp, top)
            for params, seed, n, prompt, output, lp, top in sampling
        ],
        grammar_rows=list(grammar_rows),
        grammar_bitmask=grammar_bitmask,
        pool_spans=list(pool_spans),
        text_only=text_only,
        plain_greedy=plain_greedy,
    )
