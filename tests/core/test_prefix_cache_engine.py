"""RadixAttention in the engine: reuse without changing output, eviction, cached_tokens, n>1, policies."""

from __future__ import annotations

import random

import pytest

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.messages import AddRequest
from radixlm.testing import cached_model_folder
from tests.parity_utils import assert_greedy_match, drive_core, hf_greedy

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


def _core(arch="llama", impl="auto", **kw) -> EngineCore:
    kw.setdefault("max_total_tokens", 8192)
    return EngineCore(
        EngineConfig(
            model_path=str(cached_model_folder(arch)),
            model_impl=impl,
            dtype="float32",
            inline_core=True,
            **kw,
        )
    )


def _run(core: EngineCore, prompts, params=GREEDY, stagger=0) -> dict:
    return drive_core(core, prompts, params, stagger)


def _count_shared_decode_steps(monkeypatch) -> list[int]:
    """Spy on the torch backend: one entry per step that grouped decodes sharing a cached prefix. The
    in-place decode kernel is switched off: with it, a float32 pool is grouped only where the float32 flash
    kernel runs (TorchAttnBackend._groups_pay; a CPU with AVX-512), and these float32 tests are here for
    the grouped path on every CPU."""
    from radixlm.layers import cpu_kernels
    from radixlm.layers.attention_backends import torch_backend

    monkeypatch.setattr(cpu_kernels, "DECODE_ATTENTION", False)

    steps: list[int] = []
    real = torch_backend.build_shared_groups

    def spy(*args, **kwargs):
        groups = real(*args, **kwargs)
        steps.append(groups.num_groups)
        return groups

    monkeypatch.setattr(torch_backend, "build_shared_groups", spy)
    return steps


def _shared_prompts(seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    sys_a = [rng.randrange(3, 2000) for _ in range(120)]
    sys_b = [rng.randrange(3, 2000) for _ in range(70)]
    q = lambda n: [rng.randrange(3, 2000) for _ in range(n)]  # noqa: E731
    prompts = [sys_a + q(10), sys_a + q(25), sys_b + q(5), sys_a + q(10)[:3], sys_b + q(40)]
    prompts.append(prompts[0][:60])  # a prefix of another prompt
    prompts.append(list(prompts[1]))  # the same prompt twice
    prompts.append(prompts[2] + q(30))  # another prompt extends a whole prompt
    return prompts


@pytest.mark.parametrize("arch,impl", [("llama", "native"), ("gemma3", "transformers")])
@pytest.mark.parametrize("stagger", [0, 2])
def test_cache_does_not_change_greedy_output_and_matches_transformers(
    arch, impl, stagger, monkeypatch
) -> None:
    prompts = _shared_prompts()
    shared_steps = _count_shared_decode_steps(monkeypatch)
    on = _run(_core(arch, impl, chunked_prefill_size=32), prompts, stagger=stagger)
    assert shared_steps, "no step attended decodes of a shared prefix together"
    off = _run(_core(arch, impl, chunked_prefill_size=32, disable_radix_cache=True), prompts, stagger=stagger)
    assert on["ids"] == off["ids"]
    assert sum(on["cached"]) > 0 and sum(off["cached"]) == 0
    path = cached_model_folder(arch)
    for i, p in enumerate(prompts):
        ref, margins = hf_greedy(path, p, GREEDY["max_new_tokens"])
        assert_greedy_match(on["ids"][i], ref, margins, f"{arch}/{impl} cache on, prompt {i}")


@pytest.mark.parametrize("page_size", [1, 4])
def test_eviction_under_pressure_serves_everything(page_size) -> None:
    rng = random.Random(3)
    # 3 prefixes cycle through a pool that holds about 4 sequences: 24 * 132 tokens cannot all stay cached
    prefixes = [[rng.randrange(3, 2000) for _ in range(100)] for _ in range(3)]
    prompts = [prefixes[i % 3] + [rng.randrange(3, 2000) for _ in range(20)] for i in range(24)]
    small = _core(max_total_tokens=600, page_size=page_size, chunked_prefill_size=64)
    got = _run(small, prompts, stagger=1)
    ref = _run(_core(disable_radix_cache=True), prompts)
    assert got["ids"] == ref["ids"]
    assert small.kv.cache.total_size <= small.kv.capacity
    assert sum(got["cached"]) > 0


def test_cached_tokens_reports_a_300_token_prefix() -> None:
    core = _core()
    rng = random.Random(1)
    prefix = [rng.randrange(3, 2000) for _ in range(300)]
    first = _run(core, [prefix + [5, 6, 7]])
    second = _run(core, [prefix + [9, 10, 11, 12]])
    assert first["cached"][0] == 0
    assert second["cached"][0] >= 300


def test_n_samples_and_same_wave_requests_compute_a_shared_prompt_once() -> None:
    rng = random.Random(2)
    shared = [rng.randrange(3, 2000) for _ in range(200)]
    core = _core()
    _run(
        core,
        [shared + [rng.randrange(3, 2000) for _ in range(8)] for _ in range(6)],
        params={**GREEDY, "max_new_tokens": 1},
    )
    computed = core.num_tokens_computed
    # 6 prompts of 208 tokens: without sharing that is 1248 tokens; computed once it is 208 + 5 * 8 (+ small slack)
    assert computed <= 208 + 5 * 9, computed
    off = _core(disable_radix_cache=True)
    _run(
        off,
        [shared + [rng.randrange(3, 2000) for _ in range(8)] for _ in range(6)],
        params={**GREEDY, "max_new_tokens": 1},
    )
    assert off.num_tokens_computed >= 6 * 208


def test_flush_cache_refuses_while_running_and_empties_when_idle() -> None:
    core = _core()
    core.add_request(AddRequest(["a"], list(range(5, 60)), GREEDY))
    ok, msg = core.flush_cache()
    assert not ok and "running" in msg
    while core.has_work():
        core.step()
    assert core.kv.cache.total_size > 0
    ok, msg = core.flush_cache()
    assert ok and core.kv.cache.total_size == 0
    core.check()


def test_retraction_keeps_computed_kv_in_the_tree() -> None:
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 2000) for _ in range(90)] for _ in range(8)]
    params = {**GREEDY, "max_new_tokens": 30}
    on = _core(max_total_tokens=450, chunked_prefill_size=64)
    off = _core(max_total_tokens=450, chunked_prefill_size=64, disable_radix_cache=True)
    got_on, got_off = _run(on, prompts, params), _run(off, prompts, params)
    assert got_on["ids"] == got_off["ids"]
    assert on.scheduler.num_retractions > 0 and off.scheduler.num_retractions > 0
    # resuming from the tree recomputes less than resuming from nothing
    assert on.num_tokens_computed < off.num_tokens_computed


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight"])
def test_policies_keep_output_and_accounting(policy) -> None:
    prompts = _shared_prompts(seed=9)
    got = _run(_core(schedule_policy=policy, max_running_requests=3), prompts)
    ref = _run(_core(disable_radix_cache=True), prompts)
    assert got["ids"] == ref["ids"]


def test_n_copies_of_a_short_prompt_compute_it_once() -> None:
    core = _core()
    prompt = list(range(10, 30))  # 20 tokens: shorter than the long-prefix threshold
    for i in range(4):
        core.add_request(AddRequest([f"c{i}"], prompt, {**GREEDY, "max_new_tokens": 1}))
    while core.has_work():
        core.step()
        core.check()
    # the first copy computes 20 tokens; the other three reuse 19 and compute only their last token
    assert core.num_tokens_computed == 20 + 3


@pytest.mark.parametrize("prompt_len", [20, 300])
def test_n_samples_of_one_add_request_compute_the_prompt_once(prompt_len) -> None:
    # One AddRequest with n rids is one group: the later samples wait for the leader's prompt by
    # construction, whatever the prompt's length, and each reports its own cached prefix.
    core = _core(chunked_prefill_size=64)
    prompt = [3 + (i * 7919) % 1990 for i in range(prompt_len)]
    core.add_request(AddRequest([f"s{i}" for i in range(4)], prompt, {**GREEDY, "max_new_tokens": 2}))
    cached = {}
    while core.has_work():
        for o in core.step():
            cached[o.rid] = o.cached_tokens
        core.check()
    assert core.num_tokens_computed == prompt_len + 3 * 1 + 4 * 1  # prompt once, 3 last tokens, 4 decodes
    assert cached["s0"] == 0 and all(cached[f"s{i}"] == prompt_len - 1 for i in (1, 2, 3)), cached
