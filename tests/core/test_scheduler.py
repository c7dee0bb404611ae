"""Scheduler, driven directly with no model: a KVManager over a small PageAllocator, and a fake "model" that
applies each StepInput to a DeviceReqToToken on the CPU, commits, and appends a pseudo-random token to every
request whose span samples.

Every step is checked against the requests (spans' rows, starts, tokens and slots; at most max_running;
prompt tokens within the chunk and prefill budgets; decodes are spans of 1; the table writes plus the span
slots reproduce the host rows on the device table) and ``scheduler.check()`` runs after every commit. A
hypothesis property drives random arrivals, shared prefixes, n > 1 groups, aborts and pools small enough to
force retraction, over the three policies, both caches and page sizes 1 and 4: every request finishes (or
is refused only when it can never fit), none starves, and at the end every slot is free. Plain unit tests
pin the budget rules.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from radixlm.core.request import Request, RequestStatus
from radixlm.core.schedule_policy import make_policy
from radixlm.core.scheduler import ScheduledStep, Scheduler
from radixlm.kv.kv_manager import KVManager
from radixlm.kv.no_prefix_cache import NoPrefixCache
from radixlm.kv.page_allocator import PageAllocator
from radixlm.kv.radix_cache import RadixCache
from radixlm.kv.req_to_token import DeviceReqToToken, ReqToToken
from radixlm.messages import ABORT_CLIENT, ABORT_REFUSED, FinishReason
from radixlm.sampling_params import SamplingParams

# Set to False once Scheduler.commit caches 1-token prompt chunks (see
# test_a_one_token_prompt_chunk_is_cached): the group property then also runs with chunked_prefill_size=1.

MAX_CONTEXT = 128
VOCAB = 4  # few token ids: sampled continuations collide and share prefixes too


def make_scheduler(
    *,
    cache: str = "radix",
    page_size: int = 1,
    num_pages: int = 64,
    policy: str = "fcfs",
    max_running: int = 4,
    max_prefill: int = 64,
    chunk: int | None = None,
) -> Scheduler:
    c = RadixCache(page_size) if cache == "radix" else NoPrefixCache(page_size)
    # +1 row, as EngineCore does: a retraction and a re-admission in one step never run out of rows
    kv = KVManager(PageAllocator(num_pages, page_size), ReqToToken(max_running + 1, MAX_CONTEXT), c)
    return Scheduler(
        kv=kv,
        policy=make_policy(policy),
        max_running_requests=max_running,
        max_prefill_tokens=max_prefill,
        chunked_prefill_size=chunk,
    )


def make_request(rid: str, prompt: list[int], max_new: int, leader: Request | None = None) -> Request:
    params = SamplingParams(max_new_tokens=max_new)
    return Request(rid, list(prompt), len(prompt), params, seed=hash(rid) % 1000, leader=leader)


@dataclass
class Sim:
    """The fake model loop around one Scheduler."""

    sched: Scheduler
    seed: int = 0
    rng: random.Random = field(init=False)
    device: DeviceReqToToken = field(init=False)
    prompt_computed: dict[str, int] = field(default_factory=dict)  # prompt tokens scheduled, per rid
    steps: list[ScheduledStep] = field(default_factory=list)
    refused: list[Request] = field(default_factory=list)
    num_steps: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        rt = self.sched.kv.req_to_token
        self.device = DeviceReqToToken(rt.num_rows, rt.max_context_len, "cpu")

    def add(self, req: Request) -> None:
        self.prompt_computed.setdefault(req.rid, 0)
        self.sched.add_request(req)

    def step(self) -> ScheduledStep | None:
        sched = self.sched
        running_before = list(sched.running)
        step = sched.schedule()
        for req in sched.drain_aborted():
            assert req.finished and req.finish_reason is not None
            assert req.finish_reason.abort_kind == ABORT_REFUSED and req.kv is None
            assert req not in sched.running and req not in sched.waiting
            self.refused.append(req)
        if step is None:
            sched.check()
            return None
        self.num_steps += 1
        self.check_step(step, running_before)
        sched.commit(step)
        for span in step.sampling_spans:
            req = span.req
            req.token_ids.append(self.rng.randrange(VOCAB))
            if req.num_output_tokens >= req.params.max_new_tokens:
                req.finish(FinishReason.of_length(req.num_output_tokens))
                sched.finish(req)
                assert req.kv is None and req not in sched.running
        sched.check()
        self.check_rows()
        return step

    def check_rows(self) -> None:
        """Between steps: no running row reads a free slot, and no two rows share a private page."""
        kv = self.sched.kv
        page = kv.page_size
        used = kv.allocator._used  # no public per-page query; the ground truth here
        private: set[int] = set()
        for req in self.sched.running:
            row = kv.slots(req.kv)
            assert all(used[s // page] for s in row), f"{req.rid} reads a free slot"
            mine = {s // page for s in row[req.kv.cached_len :]}
            assert not mine & private, "two running requests share a private page"
            private |= mine

    def check_step(self, step: ScheduledStep, running_before: list[Request]) -> None:
        sched = self.sched
        kv = sched.kv
        spans, inp = step.spans, step.step_input
        assert spans, "an empty step"
        assert len(spans) <= sched.max_running_requests and len(sched.running) <= sched.max_running_requests
        reqs = [s.req for s in spans]
        assert len({id(r) for r in reqs}) == len(reqs), "a request got two spans"
        assert all(r in sched.running and r.status is RequestStatus.RUNNING for r in reqs)
        assert len(inp.spans) == len(spans)
        sampling = 0
        budget_taken: list[int] = []  # spans that count against the prompt budgets
        for s, si in zip(spans, inp.spans):
            req = s.req
            row = kv.slots(req.kv)
            assert (
                s.start == req.num_computed_tokens and 0 < s.length and s.start + s.length <= req.num_tokens
            )
            assert s.start % kv.page_size == 0 or req in running_before, "a prefix hit is whole pages"
            assert len(row) == s.start + s.length, "the row must cover the computed tokens and the span"
            assert si.row == req.kv.row and si.start == s.start
            assert si.token_ids == req.token_ids[s.start : s.start + s.length]
            assert si.slots == s.slots == row[s.start :], "span slots are the row's new slots"
            assert si.samples == s.samples == (s.start + s.length == req.num_tokens)
            if req.num_remaining == 1:
                assert s.length == 1  # a decode is a span of 1
            if req not in running_before or s.length > 1:
                budget_taken.append(s.length)
            if sched.chunk_size is None:
                assert s.length == req.num_remaining, "without chunking a prompt is never split"
            sampling += s.samples
            # prompt tokens computed (again, after a retraction) by this span
            self.prompt_computed[req.rid] += max(0, min(s.start + s.length, req.num_prompt_tokens) - s.start)
        assert len(inp.sampling) == sampling
        for s, si in zip(step.sampling_spans, inp.sampling):
            assert si.seed == s.req.seed and si.num_output_tokens == s.req.num_output_tokens
        total = sum(budget_taken)
        if sched.chunk_size is not None:
            assert total <= min(sched.chunk_size, sched.max_prefill_tokens), "prompt tokens over the budget"
        else:
            # without chunking an over-budget prompt still runs, but alone
            assert total <= sched.max_prefill_tokens or len(budget_taken) == 1, (
                "prompt tokens over the budget"
            )
        assert inp.num_tokens == step.num_tokens == sum(s.length for s in spans)
        # the device table, fed only by the StepInput, must read what the host rows say
        self.device.apply(list(inp.table_writes) + [(si.row, si.start, si.slots) for si in inp.spans])
        for req in sched.running:
            row = kv.slots(req.kv)
            assert self.device.table[req.kv.row, : len(row)].tolist() == row, "device row != host row"

    def run(self, max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work():
                return
            assert self.step() is not None, "work is waiting but nothing was scheduled"
        raise AssertionError(f"not done after {max_steps} steps: a request starves")


def finish_all_and_check_empty(sim: Sim) -> None:
    kv = sim.sched.kv
    assert not sim.sched.running and not sim.sched.waiting
    kv.check()
    assert kv.cache.locked_size == 0
    kv.flush()
    assert kv.allocator.num_free_slots == kv.capacity, "a slot leaked"
    assert kv.num_free_rows == kv.req_to_token.num_rows


# ---- the property --------------------------------------------------------------------------------------


@dataclass
class Arrival:
    step: int
    prompt: list[int]
    max_new: int
    n: int
    abort_at: int | None  # a step (from arrival) at which the client aborts the first sample


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    page = draw(st.sampled_from([1, 4]), label="page")
    num_pages = draw(st.integers(3, 10) if page == 4 else st.integers(10, 40), label="num_pages")
    capacity = num_pages * page
    system = draw(
        st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=14), min_size=1, max_size=3)
    )
    arrivals = []
    for _ in range(draw(st.integers(1, 7), label="num_requests")):
        prefix = draw(st.sampled_from(system)) if draw(st.booleans()) else []
        tail = draw(st.lists(st.integers(0, VOCAB - 1), min_size=0 if prefix else 1, max_size=10))
        prompt = (prefix + tail)[: capacity - 1]  # the front refuses prompts that leave no room (EngineCore)
        arrivals.append(
            Arrival(
                step=draw(st.integers(0, 8)),
                prompt=prompt,
                max_new=draw(st.integers(1, 10)),
                n=draw(st.sampled_from([1, 1, 1, 2, 3])),
                abort_at=draw(st.none() | st.none() | st.integers(0, 12)),
            )
        )
    return dict(
        page=page,
        num_pages=num_pages,
        cache=draw(st.sampled_from(["radix", "none"])),
        policy=draw(st.sampled_from(["fcfs", "lpm", "dfs-weight"])),
        chunk=draw(st.sampled_from([None, 2, 3, 5, 8, 16])),
        max_prefill=draw(st.sampled_from([4, 8, 16, 64])),
        max_running=draw(st.integers(1, 5)),
        arrivals=arrivals,
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_random_traffic_every_request_finishes(sc: dict) -> None:
    sched = make_scheduler(
        cache=sc["cache"],
        page_size=sc["page"],
        num_pages=sc["num_pages"],
        policy=sc["policy"],
        max_running=sc["max_running"],
        max_prefill=sc["max_prefill"],
        chunk=sc["chunk"],
    )
    sim = Sim(sched, seed=sc["seed"])
    capacity = sched.kv.capacity
    pending = sorted(enumerate(sc["arrivals"]), key=lambda a: a[1].step)
    everyone: list[Request] = []
    aborts: list[tuple[int, Request]] = []
    client_aborted: set[str] = set()
    total_tokens = sum((len(a.prompt) + a.max_new) * a.n for a in sc["arrivals"])
    step_no = 0
    while pending or sched.has_work():
        while pending and pending[0][1].step <= step_no:
            i, a = pending.pop(0)
            leader = None
            for k in range(a.n):
                req = make_request(f"r{i}.{k}", a.prompt, a.max_new, leader=leader)
                leader = leader or req
                everyone.append(req)
                sim.add(req)
            if a.abort_at is not None:
                aborts.append((step_no + a.abort_at, leader))
        for when, req in [x for x in aborts if x[0] <= step_no]:
            aborts.remove((when, req))
            out = sched.abort(req.rid, "bye")
            if out is None:
                assert req.finished  # it had already finished: nothing to abort
            else:
                assert out is req and req.finished and req.finish_reason.abort_kind == ABORT_CLIENT
                assert req.kv is None and req not in sched.running and req not in sched.waiting
                client_aborted.add(req.rid)
            sched.check()
        sim.step()
        step_no += 1
        # each step computes at least one token of the oldest running request (it is never retracted while
        # others run); arrivals add at most 8 idle steps. Observed: under 2 steps per token.
        assert step_no < 3 * total_tokens + 20, "a request starves"
    for req in everyone:
        assert req.finished, f"{req.rid} never finished"
        reason = req.finish_reason
        if req.rid in client_aborted:
            assert reason.abort_kind == ABORT_CLIENT
        elif reason.is_abort:
            assert reason.abort_kind == ABORT_REFUSED
            # refused only when it can never fit: alone in the pool, its next span still did not fit
            assert req.num_tokens > capacity, (
                f"{req.rid} refused with {req.num_tokens} tokens, capacity {capacity}"
            )
        else:
            assert reason.type == "length" and req.num_output_tokens == req.params.max_new_tokens
            assert req.token_ids[: req.num_prompt_tokens] == req.prompt_ids
    event(f"retractions: {'some' if sched.num_retractions else 'none'}")
    event(f"refused: {'some' if sim.refused else 'none'}")
    finish_all_and_check_empty(sim)


def aligned(n: int, page: int) -> int:
    return n - n % page


@settings(max_examples=40, deadline=None)
@given(
    page=st.sampled_from([1, 4]),
    cache=st.sampled_from(["radix", "none"]),
    policy=st.sampled_from(["fcfs", "lpm", "dfs-weight"]),
    prompt_len=st.integers(2, 30),
    n=st.integers(2, 4),
    chunk=st.sampled_from([None, 1, 2, 3, 7, 16]),
)
def test_a_group_computes_its_prompt_once(
    page: int, cache: str, policy: str, prompt_len: int, n: int, chunk
) -> None:
    """n samples of one prompt: the leader computes it, the others reuse it from the cache and compute only
    what a page-aligned match cannot give them (the last token, or the last partial page)."""
    sched = make_scheduler(cache=cache, page_size=page, num_pages=256 // page, policy=policy, chunk=chunk)
    sim = Sim(sched)
    prompt = [(7 * i) % 11 for i in range(prompt_len)]
    leader = make_request("g.0", prompt, 4)
    group = [leader] + [make_request(f"g.{k}", prompt, 4, leader=leader) for k in range(1, n)]
    for r in group:
        sim.add(r)
    sim.run()
    assert sched.num_retractions == 0
    assert all(r.finish_reason.type == "length" for r in group)
    computed = [sim.prompt_computed[r.rid] for r in group]
    if cache == "radix":
        follower = prompt_len - aligned(prompt_len - 1, page)
        assert computed == [prompt_len] + [follower] * (n - 1), (
            f"prompt tokens computed per sample: {computed}"
        )
        assert all(r.cached_tokens == aligned(prompt_len - 1, page) for r in group[1:])
    else:
        assert computed == [prompt_len] * n  # nothing to share: nobody waits either
    finish_all_and_check_empty(sim)


# ---- budget rules ---------------------------------------------------------------------------------------


def span_lengths(step: ScheduledStep | None) -> dict[str, int]:
    assert step is not None
    return {s.req.rid: s.length for s in step.spans}


def test_chunked_prefill_splits_a_long_prompt() -> None:
    sim = Sim(make_scheduler(chunk=4, max_prefill=64))
    sim.add(make_request("a", list(range(10)), 3))
    assert [span_lengths(sim.step())["a"] for _ in range(5)] == [4, 4, 2, 1, 1]
    assert sim.sched.running == [] and sim.prompt_computed["a"] == 10
    finish_all_and_check_empty(sim)


def test_chunks_are_cached_as_they_are_computed() -> None:
    sim = Sim(make_scheduler(chunk=4))
    a = make_request("a", list(range(10)), 3)
    sim.add(a)
    sim.step()
    sim.step()
    assert a.kv.cached_len == 8 and sim.sched.kv.cache.locked_size == 8
    sim.run()
    finish_all_and_check_empty(sim)


def test_the_prefill_budget_is_per_step_and_without_chunking_a_prompt_is_not_split() -> None:
    sim = Sim(make_scheduler(max_prefill=8))
    for rid in "abc":
        sim.add(make_request(rid, [ord(rid)] * 6, 2))
    assert span_lengths(sim.step()) == {"a": 6}  # b's 6 do not fit in the 2 left, and are not split
    assert span_lengths(sim.step()) == {"a": 1, "b": 6}  # a decode costs no prompt budget
    assert span_lengths(sim.step()) == {"b": 1, "c": 6}  # a finished; b decodes
    sim.run()
    finish_all_and_check_empty(sim)


def test_with_chunking_the_budget_is_filled_with_a_chunk() -> None:
    sim = Sim(make_scheduler(max_prefill=8, chunk=8))
    for rid in "abc":
        sim.add(make_request(rid, [ord(rid)] * 6, 2))
    assert span_lengths(sim.step()) == {"a": 6, "b": 2}
    assert span_lengths(sim.step()) == {"a": 1, "b": 4, "c": 4}
    sim.run()
    finish_all_and_check_empty(sim)


def test_without_chunking_an_over_budget_prompt_runs_alone() -> None:
    sim = Sim(make_scheduler(max_prefill=4))
    sim.add(make_request("long", list(range(10)), 2))
    sim.add(make_request("short", [1], 2))
    assert span_lengths(sim.step()) == {"long": 10}
    assert span_lengths(sim.step()) == {"long": 1, "short": 1}
    sim.run()
    finish_all_and_check_empty(sim)


def test_admission_leaves_a_page_per_running_request_for_its_decode() -> None:
    sim = Sim(make_scheduler(num_pages=10))
    a = make_request("a", [1] * 4, 5)
    sim.add(a)
    assert span_lengths(sim.step()) == {"a": 4}
    sim.add(make_request("b", [2] * 5, 2))
    # a's decode leaves 5 free slots: b's 5 would fit, but not with one slot kept for a's next decode
    assert span_lengths(sim.step()) == {"a": 1}
    assert sim.sched.kv.allocator.num_free_slots == 5 and sim.sched.num_retractions == 0
    sim.run()
    assert sim.sched.num_retractions == 0
    finish_all_and_check_empty(sim)


def test_max_running_requests() -> None:
    sim = Sim(make_scheduler(max_running=2))
    for i in range(5):
        sim.add(make_request(f"r{i}", [i, i + 1], 3))
    while sim.sched.has_work():
        step = sim.step()
        assert step is not None and len(step.spans) <= 2 and len(sim.sched.running) <= 2
    finish_all_and_check_empty(sim)


def test_a_prefix_hit_starts_the_span_later_and_costs_no_budget() -> None:
    sim = Sim(make_scheduler(page_size=4, max_prefill=4))
    a = make_request("a", list(range(13)), 2)
    sim.add(a)
    sim.run()
    b = make_request("b", list(range(13)) + [99, 98, 97], 2)
    sim.add(b)
    step = sim.step()
    assert step is not None and len(step.spans) == 1
    # a's 13 prompt tokens and its first output token are cached: whole pages, 12 of b's first 15 tokens
    assert step.spans[0].start == 12 and step.spans[0].length == 4 and b.cached_tokens == 12
    assert sim.prompt_computed["b"] == 4
    sim.run()
    finish_all_and_check_empty(sim)


def test_the_newest_request_is_retracted_and_resumes_from_the_cache() -> None:
    # 12 slots: both fit at first; their decodes fill the pool before either finishes. After the
    # retraction old needs only a few more slots, so new's prompt stays cached while it waits.
    sim = Sim(make_scheduler(num_pages=12, max_prefill=64))
    old = make_request("old", [1] * 4, 5)
    new = make_request("new", [2] * 4, 4)
    sim.add(old)
    sim.add(new)
    retracted_at = None
    while sim.sched.has_work():
        before = new.num_retractions
        step = sim.step()
        assert step is not None
        if new.num_retractions > before and retracted_at is None:
            retracted_at = new.num_tokens
            assert new.status is RequestStatus.WAITING and new.kv is None
            assert old.status is RequestStatus.RUNNING  # the oldest keeps running
    assert retracted_at is not None and old.num_retractions == 0 and sim.sched.num_retractions >= 1
    assert old.finish_reason.type == new.finish_reason.type == "length"
    # it resumed from its cached KV: it did not compute its prompt twice
    assert sim.prompt_computed["new"] == 4
    finish_all_and_check_empty(sim)


def test_a_request_that_can_never_fit_is_refused() -> None:
    sim = Sim(make_scheduler(num_pages=8, page_size=1))
    big = make_request("big", [1] * 6, 10)  # 6 + 10 - 1 tokens of KV: more than the 8 slots
    small = make_request("small", [2] * 2, 2)
    sim.add(big)
    sim.add(small)
    sim.run()
    assert big.finish_reason.is_abort and big.finish_reason.abort_kind == ABORT_REFUSED
    assert sim.refused == [big] and big.num_tokens > 8
    assert small.finish_reason.type == "length"
    finish_all_and_check_empty(sim)


def test_abort_a_waiting_and_a_running_request() -> None:
    sim = Sim(make_scheduler(max_running=1))
    a = make_request("a", [1, 2, 3], 5)
    b = make_request("b", [4, 5, 6], 5)
    sim.add(a)
    sim.add(b)
    sim.step()
    assert sim.sched.abort("b", "bye") is b and b.finish_reason.abort_kind == ABORT_CLIENT
    assert sim.sched.waiting == deque_of([])
    assert sim.sched.abort("a", "bye") is a and a.kv is None and sim.sched.running == []
    assert sim.sched.abort("a", "again") is None and sim.sched.abort("nobody", "x") is None
    sim.sched.check()
    assert not sim.sched.has_work() and sim.sched.schedule() is None
    finish_all_and_check_empty(sim)


def deque_of(items: list) -> object:
    from collections import deque

    return deque(items)


def test_followers_wait_for_the_leader_then_reuse_its_prompt() -> None:
    sim = Sim(make_scheduler(chunk=4))
    prompt = list(range(10))
    leader = make_request("s.0", prompt, 3)
    followers = [make_request(f"s.{k}", prompt, 3, leader=leader) for k in (1, 2)]
    for r in [leader] + followers:
        sim.add(r)
    assert span_lengths(sim.step()) == {"s.0": 4}  # the followers wait: the prompt is not cached yet
    assert span_lengths(sim.step()) == {"s.0": 4}
    assert span_lengths(sim.step()) == {"s.0": 2}  # ... still: leader at 8 of 10
    step = sim.step()
    assert span_lengths(step) == {"s.0": 1, "s.1": 1, "s.2": 1}  # they reuse 9 cached tokens each
    assert [s.start for s in step.spans[1:]] == [9, 9]
    sim.run()
    assert [sim.prompt_computed[r.rid] for r in [leader] + followers] == [10, 1, 1]
    finish_all_and_check_empty(sim)


def test_a_shared_prefix_waits_for_the_prompt_in_progress() -> None:
    sim = Sim(make_scheduler(chunk=16, max_prefill=64))
    system = list(range(40))
    a = make_request("a", system + [1, 2, 3], 2)
    b = make_request("b", system + [7, 8], 2)
    sim.add(a)
    sim.add(b)
    assert span_lengths(sim.step()) == {"a": 16}  # b shares 40 uncached tokens with a: it waits
    assert span_lengths(sim.step()) == {"a": 16}
    step = sim.step()
    lengths = span_lengths(step)
    assert lengths["a"] == 11
    sim.run()
    assert sim.prompt_computed["b"] <= 42 - 32, "b recomputed the shared prefix"
    finish_all_and_check_empty(sim)


def test_a_shared_prefix_waits_for_the_last_chunk_of_the_prompt_in_progress() -> None:
    sim = Sim(make_scheduler(chunk=48, max_prefill=64, num_pages=256))
    system = list(range(80))
    a = make_request("a", system + [1, 2, 3], 2)
    b = make_request("b", system + [7, 8], 2)
    sim.add(a)
    sim.add(b)
    assert span_lengths(sim.step()) == {"a": 48}
    # a's last chunk holds 32 more shared tokens, cached only when this step commits: b waits for them
    assert span_lengths(sim.step()) == {"a": 35}
    step = sim.step()
    assert span_lengths(step)["b"] == 2 and step.spans[-1].start == 80
    sim.run()
    assert sim.prompt_computed["b"] == 2, "b recomputed part of the shared prefix"
    finish_all_and_check_empty(sim)


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "dfs-weight"])
def test_policies_order_every_waiting_request(policy: str) -> None:
    sched = make_scheduler(policy=policy)
    sim = Sim(sched)
    sim.add(make_request("warm", [1, 2, 3, 4, 5, 6], 1))
    sim.run()
    waiting = [make_request(f"w{i}", p, 1) for i, p in enumerate([[9, 9], [1, 2, 3, 4, 7], [1, 2, 8], [5]])]
    order = sched.policy.order(waiting, sched.kv.cache)
    assert sorted(r.rid for r in order) == sorted(r.rid for r in waiting)
    if policy == "lpm":
        assert order[0].rid == "w1"  # the longest cached prefix first
    if policy == "fcfs":
        assert order == waiting


def test_a_one_token_prompt_chunk_is_cached() -> None:
    """chunked_prefill_size=1: the leader's prompt goes in one token per step. Each chunk must reach the
    cache, or the followers (ready once the leader has computed all but the last prompt token) find
    nothing to reuse and compute the whole prompt again."""
    sim = Sim(make_scheduler(chunk=1))
    prompt = [3, 1, 4, 1, 5]
    leader = make_request("s.0", prompt, 2)
    follower = make_request("s.1", prompt, 2, leader=leader)
    sim.add(leader)
    sim.add(follower)
    sim.step()
    assert sim.sched.kv.cache.total_size == 1  # the first chunk is reusable at once
    sim.run()
    assert [sim.prompt_computed[r.rid] for r in (leader, follower)] == [5, 1]
    finish_all_and_check_empty(sim)
