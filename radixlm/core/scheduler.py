"""Scheduler: which spans the next step computes, under the step's budgets. It decides; KVManager moves the
slots; the runner computes. It reads and writes host state only (DESIGN.md invariant 4).

One rule for everything (invariant 1): a step is a list of spans (request, n new tokens).
Per step, in this order:
  1. running requests: a decode is a span of 1; a request still in its prompt gets the next chunk.
     When the pool is short even after evicting the cache's LRU leaves, the newest running request is
     retracted (its computed KV goes to the prefix cache) and resumes later.
  2. waiting requests, in policy order, while the request, token and memory budgets allow. A prefix-cache
     hit is locked and skipped: the span starts at the match and the match costs no prefill budget.
     A request that still has prompt positions to score (prompt logprobs) uses the cache only up to the
     first of them: their logits must be computed.
     The later samples of an n > 1 group wait until their leader's prompt is cached, then reuse it; a
     request that shares a long not-yet-cached prefix with a prompt being computed in this wave waits for
     it the same way, instead of computing the same prefix twice in parallel.
Chunking bounds the prompt tokens of a step, so a long prompt never stalls the running decodes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from radixlm.core.images import fit_image_blocks
from radixlm.core.request import Request, RequestStatus
from radixlm.core.schedule_policy import SchedulePolicy
from radixlm.kv.kv_manager import KVManager
from radixlm.kv.prefix_cache import MatchResult
from radixlm.messages import ABORT_CLIENT, ABORT_REFUSED, FinishReason
from radixlm.model.step_input import SamplingInput, SpanInput, StepInput

# A waiting request that shares at least this many uncached tokens with a prompt in progress waits for it.
SHARED_PREFIX_WAIT_THRESHOLD = 32


@dataclass(slots=True)
class Span:
    req: Request
    start: int  # == req.num_computed_tokens when scheduled
    length: int
    slots: list[int]  # KV slots for the new tokens
    # The span reaches the end of the request's tokens (decided when it is scheduled; the tokens appended
    # after its forward do not change what this step computed): it samples the next token, unless the
    # request wants none (max_new_tokens=0: a prompt computed only for its logprobs or its cache), which
    # then ends without a sample and the core finishes it after commit.
    samples: bool = False
    ends_without_sample: bool = False
    # Prompt logprobs: positions scored_from .. scored_from + num_scored - 1 are scored in this span.
    scored_from: int = 0
    num_scored: int = 0

    @property
    def reaches_end(self) -> bool:
        return self.start + self.length == self.req.num_tokens


def _span(req: Request, start: int, length: int, slots: list[int]) -> Span:
    if start + length != len(req.token_ids):
        return Span(req, start, length, slots)
    wants = req.params.max_new_tokens > 0
    return Span(req, start, length, slots, wants, not wants)


@dataclass
class ScheduledStep:
    spans: list[Span]
    step_input: StepInput
    sampling_spans: list[Span] = field(default_factory=list)  # the spans that sample, in span order

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.spans)


@dataclass
class _StepBudget:
    prefill_tokens: int  # new (uncached) prompt tokens this step may still take
    chunk_tokens: int  # bound from chunked_prefill_size
    chunking: bool
    scheduled_prefill: int = 0

    def span_for(self, remaining: int, whole: bool = False) -> int:
        """whole: never chunk (a pooling prompt: mean pooling needs every position's hidden state in the
        step that pools, and an encoder's attention the whole prompt); it waits for a step with room."""
        room = min(self.prefill_tokens, self.chunk_tokens)
        if remaining <= room:
            return remaining
        if self.chunking and not whole:
            return room
        # Without chunking an over-budget prompt still runs, alone, rather than never.
        return remaining if self.scheduled_prefill == 0 else 0

    def take(self, n: int) -> None:
        self.prefill_tokens -= n
        self.chunk_tokens -= n
        self.scheduled_prefill += n


class Scheduler:
    def __init__(
        self,
        *,
        kv: KVManager,
        policy: SchedulePolicy,
        max_running_requests: int,
        max_prefill_tokens: int,
        chunked_prefill_size: int | None,
    ) -> None:
        self.kv = kv
        self.policy = policy
        self.max_running_requests = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens
        self.chunk_size = chunked_prefill_size if chunked_prefill_size and chunked_prefill_size > 0 else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_retractions = 0
        self._aborted: list[Request] = []
        # Running requests that are not plain_spans / not plain_greedy (Request.mark_plain): while both
        # are 0, a step builds its inputs with no per-span feature checks and samples by one argmax.
        self._num_featured = 0
        self._num_not_greedy = 0

    # ---- queue ------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        req.mark_plain()
        self.waiting.append(req)

    def drain_aborted(self) -> list[Request]:
        """Requests the scheduler itself had to abort since the last call."""
        out, self._aborted = self._aborted, []
        return out

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, rid: str, message: str) -> Request | None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                req.finish(FinishReason.abort(ABORT_CLIENT, message))
                return req
        for req in self.running:
            if req.rid == rid:
                self._release(req)
                req.finish(FinishReason.abort(ABORT_CLIENT, message))
                return req
        return None

    # ---- one step ---------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep | None:
        budget = _StepBudget(
            prefill_tokens=self.max_prefill_tokens,
            chunk_tokens=self.chunk_size or self.max_prefill_tokens,
            chunking=self.chunk_size is not None,
        )
        spans = self._schedule_running(budget)
        spans += self._admit_waiting(budget, spans)
        if not spans:
            return None
        sampling_spans = [s for s in spans if s.samples]
        return ScheduledStep(spans, self._step_input(spans, sampling_spans), sampling_spans)

    def _schedule_running(self, budget: _StepBudget) -> list[Span]:
        decodes = self._schedule_decodes()
        if decodes is not None:
            return decodes
        spans: list[Span] = []
        i = 0
        while i < len(self.running):
            req = self.running[i]
            n = 1 if req.num_remaining == 1 else budget.span_for(req.num_remaining)
            if n and req.images:
                n = fit_image_blocks(req.images, req.num_computed_tokens, n)
            if n == 0:
                i += 1
                continue
            slots = self.kv.extend(req.kv, n)
            while slots is None and self.running[-1] is not req:
                self._retract(self.running[-1])
                slots = self.kv.extend(req.kv, n)
            if slots is None:
                if len(self.running) > 1 or req.num_computed_tokens == 0:
                    self._retract(req)  # it is the newest; it resumes when memory frees up
                else:
                    self._release(req)  # alone and still does not fit: it can never finish
                    req.finish(
                        FinishReason.abort(ABORT_REFUSED, "the KV cache is too small for this request")
                    )
                    self._aborted.append(req)
                continue
            if n > 1:
                budget.take(n)
            spans.append(_span(req, req.num_computed_tokens, n, slots))
            i += 1
        return spans

    def _schedule_decodes(self) -> list[Span] | None:
        """The common step: every running request decodes (one token each, no images to fit) and the pool
        has a slot for each without evicting. Their slots in one KVManager call; the spans as the general
        loop would make them. None (nothing changed): the general loop decides."""
        running = self.running
        if not running or self._num_featured:
            return None
        states = []
        for req in running:
            if len(req.token_ids) - req.num_computed_tokens != 1:
                return None
            states.append(req.kv)
        slots = self.kv.extend_decodes(states)
        if slots is None:
            return None
        # A decode reaches the end of its tokens: it samples (_span), as every generating request does.
        return [
            Span(req, req.num_computed_tokens, 1, s, True, False)
            if req.params.max_new_tokens > 0
            else _span(req, req.num_computed_tokens, 1, s)
            for req, s in zip(running, slots, strict=True)
        ]

    def _admit_waiting(self, budget: _StepBudget, spans: list[Span]) -> list[Span]:
        admitted: list[Span] = []
        if not self.waiting:
            return admitted
        cache = self.kv.cache
        # Every running request still in its prompt, including one whose last chunk runs in this step: its
        # tokens are cached only once the step commits, so a request sharing them waits one step for them.
        in_progress = [r for r in self.running if len(r.token_ids) - r.num_computed_tokens > 1]
        for req in self.policy.order(list(self.waiting), cache):
            if len(self.running) >= self.max_running_requests or self.kv.num_free_rows == 0:
                break
            if budget.chunk_tokens <= 0 or budget.prefill_tokens <= 0:
                break
            if not self._leader_ready(req):
                continue
            # Always compute at least the last token (its logits sample), and every position still to score.
            cap = min(req.num_tokens - 1, req.next_logprob_pos) if req.scores_prompt else req.num_tokens - 1
            match = self.kv.match(req.token_ids[:cap])
            if req.leader is None and self._shares_prefix_in_progress(req, match.length, in_progress):
                continue
            n = budget.span_for(req.num_tokens - match.length, whole=req.pooling)
            if n and req.images:
                n = fit_image_blocks(req.images, match.length, n)
            if n == 0:
                break
            span = self._try_admit(req, match, n)
            if span is None:
                break  # FCFS-style: do not let later, smaller requests starve this one
            budget.take(n)
            admitted.append(span)
            if span.length > 1:
                in_progress.append(req)
        return admitted

    def _leader_ready(self, req: Request) -> bool:
        """An n > 1 sample waits until its leader's prompt is computed (and so cached): it then reuses
        the prompt instead of computing it again. Without a cache that shares prefixes, waiting gains
        nothing, so it does not wait."""
        leader = req.leader
        if leader is None or not self.kv.cache.shares_prefixes or leader.finished:
            return True
        return leader.num_computed_tokens >= leader.num_prompt_tokens - 1

    def _try_admit(self, req: Request, match: MatchResult, n: int) -> Span | None:
        # Keep one page per running request free for their next decode, so admission does not force a
        # retraction.
        reserve = len(self.running) * self.kv.page_size
        admitted = self.kv.admit(match, n, reserve)
        if admitted is None:
            return None
        req.kv, slots = admitted
        req.num_computed_tokens = match.length
        if req.num_retractions == 0:
            req.cached_tokens = match.length
        self.waiting.remove(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        if not req.plain_spans:
            self._num_featured += 1
        if not req.plain_greedy:
            self._num_not_greedy += 1
        return _span(req, match.length, n, slots)

    def _shares_prefix_in_progress(self, req: Request, matched: int, in_progress: list[Request]) -> bool:
        if not in_progress or not self.kv.cache.shares_prefixes:
            return False
        tokens = req.token_ids
        # Waiting pays off when the shared part is long, or when it is all this request would compute
        # anyway: then it only computes its last token, a step later.
        enough = min(SHARED_PREFIX_WAIT_THRESHOLD, len(tokens) - 1 - matched)
        for other in in_progress:
            if enough > 0 and _common_prefix_len(tokens, other.token_ids) - matched >= enough:
                return True
        return False

    def _step_input(self, spans: list[Span], sampling_spans: list[Span]) -> StepInput:
        plain_greedy = not self._num_not_greedy
        if not self._num_featured:
            # No running request has images, M-RoPE rows, pooling or prompt logprobs: no checks per span.
            inputs = [
                SpanInput(r.kv.row, s.start, r.token_ids[s.start : s.start + s.length], s.slots, s.samples)
                for s in spans
                for r in (s.req,)
            ]
            if plain_greedy:  # no penalties, so no token lists; no logprobs
                sampling = [
                    SamplingInput(r.params, r.seed, len(r.token_ids) - r.num_prompt_tokens)
                    for s in sampling_spans
                    for r in (s.req,)
                ]
            else:
                sampling = [_sampling_input(s.req) for s in sampling_spans]
            writes = self.kv.take_table_writes()
            return StepInput(inputs, writes, sampling, text_only=True, plain_greedy=plain_greedy)
        inputs = []
        sampling = []
        pool_spans = []
        for s in spans:
            req = s.req
            samples = s.samples
            new_ids = req.token_ids[s.start : s.start + s.length]
            span_input = SpanInput(req.kv.row, s.start, new_ids, s.slots, samples)
            if req.images:  # the images this span computes positions of (the runner embeds them)
                end = s.start + s.length
                span_input.images = [
                    im for im in req.images if im["offset"] < end and im["offset"] + im["length"] > s.start
                ]
            span_input.mrope = req.mrope  # every span, decode too: positions past the prompt add its delta
            if req.scores_prompt:
                _score_prompt(s, span_input)
            if req.pooling:
                pool_spans.append(len(inputs))
            inputs.append(span_input)
            if samples:
                sampling.append(_sampling_input(req))
        return StepInput(
            inputs, self.kv.take_table_writes(), sampling, pool_spans=pool_spans, plain_greedy=plain_greedy
        )

    # ---- leaving the running batch -------------------------------------------------------------
    def _release(self, req: Request) -> None:
        """Its computed KV goes to the prefix cache (what the cache does not keep is freed)."""
        self.kv.release(req.kv, req.token_ids[: req.num_computed_tokens])
        self.running.remove(req)
        req.kv = None
        if not req.plain_spans:
            self._num_featured -= 1
        if not req.plain_greedy:
            self._num_not_greedy -= 1

    def _retract(self, req: Request) -> None:
        self._release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_retractions += 1
        self.num_retractions += 1
        self.waiting.appendleft(req)

    # ---- after the forward pass ----------------------------------------------------------------
    def commit(self, step: ScheduledStep) -> None:
        """The step's KV is now computed; prompt chunks become reusable by later requests at once."""
        for span in step.spans:
            req = span.req
            # A prompt chunk (of any length, also 1 with chunked_prefill_size=1) or a span that ends the
            # prompt goes to the cache; a decode (1 token that samples) waits for the request's release.
            cache_it = span.length > 1 or not span.samples
            req.num_computed_tokens += span.length
            if span.num_scored:
                req.next_logprob_pos = span.scored_from + span.num_scored
            if cache_it and not req.finished:
                self.kv.cache_computed(req.kv, req.token_ids[: req.num_computed_tokens])

    def finish(self, req: Request) -> None:
        if req.kv is not None:
            self._release(req)

    # ---- invariants ------------------------------------------------------------------------------
    def check(self) -> None:
        """Invariant 2 (KVManager.check), and each running request's row covers exactly its computed
        tokens (between steps)."""
        self.kv.check()
        for req in self.running:
            n = self.kv.num_slots(req.kv)
            if n != req.num_computed_tokens:
                raise AssertionError(
                    f"request {req.rid}: {n} slots for {req.num_computed_tokens} computed tokens"
                )
            if req.next_logprob_pos < min(req.num_computed_tokens, req.logprob_end):
                raise AssertionError(
                    f"request {req.rid}: prompt position {req.next_logprob_pos} computed but never scored"
                )


def _score_prompt(span: Span, span_input: SpanInput) -> None:
    """Mark the span's rows whose prompt logprobs are still due: positions from the request's next one to
    score (never before the span) to the end of the span or of the scored range."""
    req = span.req
    lo = max(span.start, req.next_logprob_pos)
    hi = min(span.start + span.length, req.logprob_end)
    if lo >= hi:
        return
    span.scored_from, span.num_scored = lo, hi - lo
    span_input.logprob_offset = lo - span.start
    span_input.logprob_targets = req.token_ids[lo + 1 : hi + 1]
    span_input.logprob_top = req.top_logprobs_num


def _sampling_input(req: Request) -> SamplingInput:
    params = req.params
    penalties = params.has_penalties
    return SamplingInput(
        params=params,
        seed=req.seed,
        num_output_tokens=req.num_output_tokens,
        prompt_ids=(req.model_prompt_ids or req.prompt_ids) if penalties else (),
        output_ids=req.output_ids if penalties else (),
        return_logprob=req.return_logprob,
        top_logprobs_num=req.top_logprobs_num,
    )


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the common prefix, by binary search over slice equality (C-speed compares)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
