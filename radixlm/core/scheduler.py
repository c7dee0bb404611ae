"""Scheduler: which spans the next step computes, and the KV bookkeeping around them.

One rule for everything (DESIGN.md invariant 1): a step is a list of spans (request, n new tokens).
Per step, in this order:
  1. running requests: a decode is a span of 1; a request still in its prompt gets the next chunk.
     When the pool is short even after evicting the tree's LRU leaves, the newest running request is
     retracted (its computed KV goes into the tree when the cache is on) and resumes later.
  2. waiting requests, in policy order, while the request, token and memory budgets allow. A prefix-cache
     hit is locked and skipped: the span starts at the match and the match costs no prefill budget.
     A request that shares a not-yet-cached prefix with a prompt already being computed waits one step
     and then reuses it, instead of computing the same prefix twice in parallel.
Chunking bounds the prompt tokens of a step, so a long prompt never stalls the running decodes.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import torch

from radixlm.core.request import Request, RequestStatus
from radixlm.core.schedule_policy import SchedulePolicy
from radixlm.kv.kv_pool import KVPool, ReqToTokenPool
from radixlm.kv.radix_cache import PrefixCache
from radixlm.messages import ABORT_CLIENT, ABORT_REFUSED, FinishReason

# A waiting request that shares at least this many uncached tokens with a prompt in progress waits for it.
SHARED_PREFIX_WAIT_THRESHOLD = 32


@dataclass
class Span:
    req: Request
    start: int  # == req.num_computed_tokens when scheduled
    length: int
    slots: torch.Tensor  # [length] KV slots for the new tokens

    @property
    def samples(self) -> bool:
        return self.start + self.length == self.req.num_tokens


@dataclass
class ScheduledBatch:
    spans: list[Span]

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.spans)


@dataclass
class _StepBudget:
    prefill_tokens: int  # new (uncached) prompt tokens this step may still take
    chunk_tokens: int  # bound from chunked_prefill_size
    chunking: bool
    scheduled_prefill: int = 0

    def span_for(self, remaining: int) -> int:
        room = min(self.prefill_tokens, self.chunk_tokens)
        if remaining <= room:
            return remaining
        if self.chunking:
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
        pool: KVPool,
        req_pool: ReqToTokenPool,
        cache: PrefixCache,
        policy: SchedulePolicy,
        max_running_requests: int,
        max_prefill_tokens: int,
        chunked_prefill_size: int | None,
    ) -> None:
        self.pool = pool
        self.req_pool = req_pool
        self.cache = cache
        self.policy = policy
        self.max_running_requests = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens
        self.chunk_size = chunked_prefill_size if chunked_prefill_size and chunked_prefill_size > 0 else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._admit_counter = itertools.count()
        self.num_retractions = 0
        self._aborted: list[Request] = []

    # ---- queue ------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    def drain_aborted(self) -> list[Request]:
        """Requests the scheduler itself had to abort since the last call."""
        out, self._aborted = self._aborted, []
        return out

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, rid: str, message: str = "aborted") -> Request | None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                req.finish(FinishReason.abort(ABORT_CLIENT, message))
                return req
        for req in self.running:
            if req.rid == rid:
                self.release(req)
                req.finish(FinishReason.abort(ABORT_CLIENT, message))
                return req
        return None

    # ---- one step ---------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        budget = _StepBudget(
            prefill_tokens=self.max_prefill_tokens,
            chunk_tokens=self.chunk_size or self.max_prefill_tokens,
            chunking=self.chunk_size is not None,
        )
        spans = self._schedule_running(budget)
        spans += self._admit_waiting(budget, spans)
        return ScheduledBatch(spans) if spans else None

    def _schedule_running(self, budget: _StepBudget) -> list[Span]:
        spans: list[Span] = []
        i = 0
        while i < len(self.running):
            req = self.running[i]
            n = 1 if req.num_remaining == 1 else budget.span_for(req.num_remaining)
            if n == 0:
                i += 1
                continue
            slots = self._alloc_slots(req, n)
            while slots is None and self.running[-1] is not req:
                self.retract(self.running[-1])
                slots = self._alloc_slots(req, n)
            if slots is None:
                if len(self.running) > 1 or req.num_computed_tokens == 0:
                    self.retract(req)  # it is the newest; it resumes when memory frees up
                else:
                    self.release(req)  # alone and still does not fit: it can never finish
                    req.finish(FinishReason.abort(ABORT_REFUSED, "the KV cache is too small for this request"))
                    self._aborted.append(req)
                continue
            if n > 1:
                budget.take(n)
            spans.append(Span(req, req.num_computed_tokens, n, slots))
            i += 1
        return spans

    def _admit_waiting(self, budget: _StepBudget, spans: list[Span]) -> list[Span]:
        admitted: list[Span] = []
        if not self.waiting:
            return admitted
        in_progress = [s.req for s in spans if s.req.num_remaining > s.length]
        for req in self.policy.order(list(self.waiting), self.cache):
            if len(self.running) >= self.max_running_requests or self.req_pool.num_free == 0:
                break
            if budget.chunk_tokens <= 0 or budget.prefill_tokens <= 0:
                break
            match = self.cache.match_prefix(req.tokens[:-1])
            if self._shares_prefix_in_progress(req, match.length, in_progress):
                continue
            n = budget.span_for(req.num_tokens - match.length)
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

    def _try_admit(self, req: Request, match, n: int) -> Span | None:
        row = self.req_pool.alloc()
        if row is None:
            return None
        self.cache.lock(match.node)
        req.req_pool_idx = row
        req.last_node = match.node
        req.cached_len = match.length
        req.num_computed_tokens = match.length
        if match.length:
            self.req_pool.write(row, 0, match.slots)
        # Keep one slot per running request free for their next decode, so admission does not force a retraction.
        headroom = len(self.running)
        slots = self._alloc_slots(req, n, reserve=headroom)
        if slots is None:
            self.cache.unlock(match.node)
            self.req_pool.free(row)
            req.req_pool_idx, req.last_node, req.cached_len, req.num_computed_tokens = None, None, 0, 0
            return None
        if req.num_retractions == 0:
            req.cached_tokens = match.length
        self.waiting.remove(req)
        req.status = RequestStatus.RUNNING
        req.admit_order = next(self._admit_counter)
        self.running.append(req)
        return Span(req, req.num_computed_tokens, n, slots)

    def _shares_prefix_in_progress(self, req: Request, matched: int, in_progress: list[Request]) -> bool:
        tokens = req.tokens
        # Waiting pays off when the shared part is long, or when it is all this request would compute
        # anyway (n > 1 copies of one prompt): then it only computes its last token, a step later.
        enough = min(SHARED_PREFIX_WAIT_THRESHOLD, len(tokens) - 1 - matched)
        for other in in_progress:
            if enough > 0 and _common_prefix_len(tokens, other.tokens) - matched >= enough:
                return True
        return False

    # ---- memory ----------------------------------------------------------------------------------
    def _alloc_slots(self, req: Request, n: int, reserve: int = 0) -> torch.Tensor | None:
        start = req.num_computed_tokens
        last_slot = int(self.req_pool.table[req.req_pool_idx, start - 1]) if start else None
        need = self.pool.slots_needed(n, last_slot) + reserve * self.pool.page_size
        if self.pool.num_free_slots < need:
            self.cache.evict(need - self.pool.num_free_slots)
            if self.pool.num_free_slots < need:
                return None
        slots = self.pool.alloc(n, last_slot)
        if slots is None:
            return None
        self.req_pool.write(req.req_pool_idx, start, slots)
        return slots

    def _row_slots(self, req: Request, end: int) -> torch.Tensor:
        return self.req_pool.table[req.req_pool_idx, :end]

    def cache_unfinished(self, req: Request) -> None:
        """Give the computed part of a running request to the tree, so others (or its own resumption) reuse it."""
        if not self.cache.enabled or req.num_computed_tokens <= req.cached_len:
            return
        n = req.num_computed_tokens
        res = self.cache.insert(req.tokens[:n], self._row_slots(req, n).clone())
        aligned = res.slots.numel()
        if aligned:
            self.req_pool.write(req.req_pool_idx, 0, res.slots)
        self.cache.lock(res.node)
        self.cache.unlock(req.last_node)
        req.last_node = res.node
        req.cached_len = aligned

    def release(self, req: Request) -> None:
        """A request leaves the running batch: its KV goes to the tree (or is freed), its row is returned."""
        n = req.num_computed_tokens
        slots = self._row_slots(req, n).clone()
        self.cache.unlock(req.last_node)
        # insert() owns the page-aligned head from here (the tree keeps it, or frees duplicates, or, for
        # NoPrefixCache, frees it); the partial last page is still ours to free.
        self.cache.insert(req.tokens[:n], slots)
        self.pool.free(slots[n - n % self.pool.page_size :])
        self.req_pool.free(req.req_pool_idx)
        self.running.remove(req)
        req.req_pool_idx, req.last_node, req.cached_len = None, None, 0

    def retract(self, req: Request) -> None:
        self.release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_retractions += 1
        self.num_retractions += 1
        self.waiting.appendleft(req)

    # ---- after the forward pass ----------------------------------------------------------------
    def commit(self, batch: ScheduledBatch) -> None:
        """The batch's KV is now computed; prompt chunks become reusable by later requests at once."""
        for span in batch.spans:
            span.req.num_computed_tokens += span.length
            if span.length > 1 and not span.req.finished:
                self.cache_unfinished(span.req)

    def finish(self, req: Request) -> None:
        if req in self.running:
            self.release(req)

    # ---- invariants ------------------------------------------------------------------------------
    def private_slots(self) -> int:
        total = 0
        page = self.pool.page_size
        for req in self.running:
            # a private run starts page-aligned (cached_len is), so it spans ceil(len / page) pages
            total += -(-(req.num_computed_tokens - req.cached_len) // page) * page
        return total

    def check(self) -> None:
        """DESIGN.md invariant 2: free + evictable + locked + private == capacity."""
        self.pool.check()
        self.cache.check()
        # Slots allocated for a scheduled-but-uncommitted span are private too; check() runs between steps.
        total = (
            self.pool.num_free_slots
            + self.cache.evictable_size
            + self.cache.locked_size
            + self.private_slots()
        )
        if total != self.pool.capacity:
            raise AssertionError(
                f"KV accounting: free {self.pool.num_free_slots} + evictable {self.cache.evictable_size} + "
                f"locked {self.cache.locked_size} + private {self.private_slots()} != capacity {self.pool.capacity}"
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
