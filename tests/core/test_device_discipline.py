"""DESIGN.md invariant 4 at run time: the scheduler's path touches no tensor, so it can never read the device.

(tests/test_layering.py checks the same statically: the scheduler and the KV bookkeeping do not import
torch.) Here a real EngineCore serves a workload that exercises every scheduler path (prefix hits, chunked
prompts, n > 1 groups, retraction under a small pool, aborts, finishing) while a TorchFunctionMode counts
every torch call, Tensor methods included (.tolist, .item, int(), bool(), indexing), made inside the
scheduler and KVManager.
"""

from __future__ import annotations

import functools
import random

from torch.overrides import TorchFunctionMode

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.messages import AddRequest
from radixlm.testing import cached_model_folder


class _CountTorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__qualname__", str(func)))
        return func(*args, **(kwargs or {}))


def _counted(counter: _CountTorchCalls, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with counter:
            return fn(*args, **kwargs)

    return wrapper


def test_scheduler_and_kv_manager_make_no_torch_call() -> None:
    core = EngineCore(
        EngineConfig(
            model_path=str(cached_model_folder("llama")),
            dtype="float32",
            device="cpu",
            max_total_tokens=260,
            chunked_prefill_size=32,
            max_running_requests=6,
            random_seed=0,
        )
    )
    counter = _CountTorchCalls()
    sched = core.scheduler
    for name in ("schedule", "commit", "finish", "abort"):
        setattr(sched, name, _counted(counter, getattr(sched, name)))
    for name in ("admit", "extend", "cache_computed", "release", "match", "flush", "check"):
        setattr(core.kv, name, _counted(counter, getattr(core.kv, name)))

    rng = random.Random(0)
    shared = [rng.randrange(3, 2000) for _ in range(70)]
    params = {"max_new_tokens": 40, "temperature": 0.0, "ignore_eos": True}
    for i in range(8):
        prompt = shared + [rng.randrange(3, 2000) for _ in range(rng.randrange(1, 40))]
        core.add_request(AddRequest([f"r{i}"], prompt, params))
    core.add_request(AddRequest(["g0", "g1", "g2"], shared[:50], {**params, "temperature": 0.8, "seed": 1}))
    steps = 0
    while core.has_work():
        core.step()
        steps += 1
        if steps == 5:
            core.abort("r3", "test abort")
        core.check()
    core.flush_cache()

    assert core.scheduler.num_retractions > 0, "the pool was meant to be small enough to force retraction"
    assert core.total_cached_tokens > 0, "the workload was meant to hit the prefix cache"
    assert not counter.calls, f"the scheduler path made torch calls: {sorted(set(counter.calls))}"
