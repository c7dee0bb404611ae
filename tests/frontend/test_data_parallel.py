"""Data parallelism: replicas behind the router give DP=1's outputs, cache-aware routing keeps shared
prefixes on one replica (higher hit rate than round robin), and a dead replica takes only itself down."""

from __future__ import annotations

import os
import signal
import time

import pytest

from radixlm import Engine
from radixlm.bench.workloads import load_token_pool, shared_prefix_requests
from radixlm.frontend.router import PREFIX_BLOCK, PrefixIndex
from radixlm.testing import cached_model_folder

MODEL = str(cached_model_folder("qwen2", "tiny"))
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def _engine(**options) -> Engine:
    options.setdefault("inline_core", True)
    return Engine(model_path=MODEL, dtype="float32", max_total_tokens=20000, log_level="warning", **options)


def _workload(n_groups: int = 4, per_group: int = 6):
    pool = load_token_pool(MODEL)
    return shared_prefix_requests(pool, n_groups, per_group, 96, 12, 4, seed=3)


def test_dp2_gives_dp1s_outputs_and_reports_each_replica() -> None:
    prompts = [r.prompt_ids for r in _workload(3, 3)]
    with _engine() as one:
        ref = [o["output_ids"] for o in one.generate(input_ids=prompts, sampling_params=GREEDY)]
    for method in ("round_robin", "cache_aware"):
        with _engine(dp_size=2, load_balance_method=method) as two:
            out = [o["output_ids"] for o in two.generate(input_ids=prompts, sampling_params=GREEDY)]
            info = two.get_server_info()
            assert info["runtime"]["dp_size"] == 2 and len(info["replicas"]) == 2
            assert out == ref, method
            two.check()  # every replica's KV accounting


def _hit_rate(method: str) -> float:
    requests = _workload()
    with _engine(dp_size=2, load_balance_method=method, max_running_requests=4) as llm:
        # One at a time, as a stream of users would arrive: the routing decides where each prefix lives.
        outs = [llm.generate(input_ids=r.prompt_ids, sampling_params=GREEDY) for r in requests]
    cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
    return cached / sum(len(r.prompt_ids) for r in requests)


def test_cache_aware_routing_hits_the_cache_more_than_round_robin() -> None:
    rr, aware = _hit_rate("round_robin"), _hit_rate("cache_aware")
    # 4 prefixes of 96 tokens, 6 requests each: round robin computes each prefix on both replicas, the
    # cache-aware router (mostly) on one.
    assert aware > rr + 0.05, (rr, aware)


def test_prefix_index_matches_whole_blocks_and_forgets_the_oldest() -> None:
    idx = PrefixIndex(max_blocks=3)
    a = list(range(100))
    idx.insert(a[: 2 * PREFIX_BLOCK + 5])
    assert idx.match(a) == 2 * PREFIX_BLOCK
    assert idx.match([7] + a) == 0
    idx.insert([9] * (2 * PREFIX_BLOCK))  # two more blocks: the oldest of a's goes
    assert idx.match(a) == 0


def test_a_dead_replica_takes_only_itself_down() -> None:
    with _engine(dp_size=2, load_balance_method="round_robin", inline_core=False) as llm:
        pids = llm._client.pids
        assert len(pids) == 2 and all(pids)
        long = {"max_new_tokens": 2000, "temperature": 0, "ignore_eos": True}
        streams = [llm.generate(input_ids=[5, 6, 7, i + 1], sampling_params=long, stream=True) for i in range(2)]
        for s in streams:
            next(s)  # both are decoding, one on each replica
        os.kill(pids[0], signal.SIGKILL)
        reasons = []
        for s in streams:
            chunks = list(s)
            reasons.append(chunks[-1]["meta_info"]["finish_reason"])
        kinds = sorted(r["type"] for r in reasons)
        assert kinds == ["abort", "length"], reasons  # the dead replica's request ends; the other finishes
        time.sleep(0.5)
        assert llm.is_alive()
        after = llm.generate(input_ids=[1, 2, 3], sampling_params=GREEDY)  # routed to the live replica
        assert len(after["output_ids"]) == 8
        with pytest.raises(ProcessLookupError):  # the dead replica's core is gone and reaped
            os.kill(pids[0], 0)


def test_dp2_times_tp2_gives_dp1s_outputs() -> None:
    """Four ranks in two replicas, each replica's core in its own process with its own process group."""
    prompts = [[1, 2, 3, i] for i in range(1, 5)]
    with _engine() as one:
        ref = [o["output_ids"] for o in one.generate(input_ids=prompts, sampling_params=GREEDY)]
    with _engine(dp_size=2, tp_size=2, inline_core=False) as llm:
        out = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=GREEDY)]
        info = llm.get_server_info()
    assert info["runtime"]["tp_size"] == 2 and info["runtime"]["dp_size"] == 2
    assert all(r["num_steps"] > 0 for r in info["replicas"])  # both replicas served
    assert out == ref
