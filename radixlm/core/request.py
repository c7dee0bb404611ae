"""Request: one sequence's tokens, its KV state, its sampling state and why it finished.

The scheduling rule (DESIGN.md invariant 1): ``token_ids`` is one growing list (the prompt, then each
output token appended), and the KV of ``token_ids[:num_computed_tokens]`` is in the pool. Each step
computes a span ``token_ids[num_computed:num_computed+n]``; the step samples a new token only when the span
reaches the end of ``token_ids``.

The n samples of one prompt form a group: the first (the leader) computes the prompt, the others wait until
the prompt is in the prefix cache and then reuse it (Scheduler._ready).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from radixlm.kv.kv_manager import KVState
from radixlm.messages import FinishReason
from radixlm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity, not field equality: requests are looked up in lists
class Request:
    rid: str
    token_ids: list[int]  # the prompt, then the output: one list, appended to, never rebuilt
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    return_logprob: bool = False
    top_logprobs_num: int = 0
    leader: Request | None = None  # the group member that computes the shared prompt (None: itself)
    followers: list[Request] = field(default_factory=list, repr=False)  # a leader's other samples
    # Prompt logprobs (SGLang's logprob_start_len k; -1: none): the logits at prompt position p score
    # token p + 1, for p in [max(k - 1, 0), num_prompt_tokens - 2]. next_logprob_pos is the next such p
    # not yet reported; it only grows, so a retraction never reports a position twice.
    logprob_start_len: int = -1
    next_logprob_pos: int = -1  # set in __post_init__
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    kv: KVState | None = None  # while RUNNING
    # reporting
    cached_tokens: int = 0  # prefix-cache hit at first admission
    finish_reason: FinishReason | None = None
    num_retractions: int = 0
    # Constrained decoding: this sample's grammar matcher (core/grammar.RequestGrammar), or None. Kept across
    # a retraction: it has seen exactly the output tokens, which a retraction keeps.
    grammar: Any = field(default=None, repr=False)
    # Encode: the prompt's hidden states are pooled (scheduled whole, never chunked), nothing is sampled.
    pooling: bool = False
    embedding: list[float] | None = None
    # A vision-language prompt's images (messages.AddRequest.images): token_ids holds image_key_ids at
    # their positions (the prefix cache's key), model_prompt_ids the prompt as the model's processor made
    # it (penalties count those).
    images: list[dict[str, Any]] = field(default_factory=list, repr=False)
    model_prompt_ids: list[int] | None = field(default=None, repr=False)
    # M-RoPE models (Qwen2-VL) with images: (the prompt's three position rows, the delta after the prompt),
    # from the model's get_rope_index when the request arrived (model/mrope.py). Plain ints.
    mrope: tuple[list[list[int]], int] | None = field(default=None, repr=False)
    # Which per-step work this request can skip, decided once when it reaches the scheduler
    # (Scheduler.add_request, after images, M-RoPE rows and the grammar are attached; see mark_plain):
    # plain_spans: no images, M-RoPE rows, pooling or prompt logprobs, so its spans need no checks for them;
    # plain_greedy: its token is the argmax of the raw logits (greedy, no penalties, logit_bias,
    # min_new_tokens, grammar or logprobs), so sampling builds nothing for it.
    plain_spans: bool = field(default=False, repr=False)
    plain_greedy: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        k = self.logprob_start_len
        self.next_logprob_pos = max(k - 1, 0) if k >= 0 else self.num_prompt_tokens - 1

    def mark_plain(self) -> None:
        """Set plain_spans / plain_greedy from what the request uses (its fields are final by now)."""
        self.plain_spans = not (self.images or self.mrope is not None or self.pooling or self.scores_prompt)
        p = self.params
        self.plain_greedy = (
            p.is_greedy
            and not p.has_penalties
            and not p.logit_bias
            and p.min_new_tokens == 0
            and self.grammar is None
            and not self.return_logprob
            and not self.top_logprobs_num
        )

    @property
    def logprob_end(self) -> int:
        """One past the last prompt position whose logits are scored (the last prompt token's logits
        sample the first output token instead)."""
        return self.num_prompt_tokens - 1

    @property
    def scores_prompt(self) -> bool:
        """Some prompt position still has to be scored."""
        return self.next_logprob_pos < self.logprob_end

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_ids(self) -> list[int]:
        """A copy: for penalties and tests, not for the hot path."""
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        """A copy: for penalties and tests, not for the hot path."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_remaining(self) -> int:
        """Tokens whose KV still has to be computed before the next sample."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        self.status = RequestStatus.FINISHED
