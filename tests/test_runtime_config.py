"""RuntimeConfig.resolve: every default decided once, and a KV pool that fits a shared machine."""

from __future__ import annotations

import pytest

from radixlm.config import DEFAULT_CPU_KV_CAP_BYTES, EngineConfig, ModelFacts, RuntimeConfig

GiB = 1 << 30
# SmolLM2-135M in bf16: 30 layers x 3 KV heads x (64 + 64) dims x 2 bytes
SMOLLM_BYTES_PER_TOKEN = 30 * 3 * 128 * 2


def _facts(device="cpu", free=18 * GiB, per_token=SMOLLM_BYTES_PER_TOKEN, context=8192) -> ModelFacts:
    return ModelFacts(device, context, per_token, free)


def test_cpu_pool_is_capped_for_a_shared_machine() -> None:
    # The case that was OOM-killed: 25% of 18 GiB free would be 4.5 GiB of KV for a 135M model.
    rt = RuntimeConfig.resolve(EngineConfig(), _facts())
    assert rt.kv_capacity * SMOLLM_BYTES_PER_TOKEN <= DEFAULT_CPU_KV_CAP_BYTES
    assert rt.kv_capacity == DEFAULT_CPU_KV_CAP_BYTES // SMOLLM_BYTES_PER_TOKEN
    assert "CPU cap" in rt.kv_capacity_reason and "free" in rt.kv_capacity_reason


def test_pool_never_exceeds_what_running_requests_can_use() -> None:
    rt = RuntimeConfig.resolve(EngineConfig(max_running_requests=4, context_length=1000), _facts())
    assert rt.kv_capacity == 4 * 1000 and "4 requests x 1000 tokens" in rt.kv_capacity_reason


def test_little_free_memory_wins() -> None:
    rt = RuntimeConfig.resolve(EngineConfig(), _facts(free=GiB // 2))
    assert rt.kv_capacity == int(GiB // 2 * 0.25) // SMOLLM_BYTES_PER_TOKEN
    assert rt.kv_capacity_reason.startswith("0.25 of")


def test_explicit_options_override_and_lift_the_cap() -> None:
    assert RuntimeConfig.resolve(EngineConfig(max_total_tokens=1234), _facts()).kv_capacity == 1234
    big = RuntimeConfig.resolve(EngineConfig(mem_fraction_static=0.5), _facts())
    assert big.kv_capacity == int(18 * GiB * 0.5) // SMOLLM_BYTES_PER_TOKEN  # no CPU cap once asked for
    assert "CPU cap" not in big.kv_capacity_reason


def test_capacity_is_whole_pages_and_defaults_by_device() -> None:
    rt = RuntimeConfig.resolve(EngineConfig(max_total_tokens=1001, page_size=16), _facts())
    assert rt.kv_capacity == 992 and rt.num_kv_pages == 62
    cpu, gpu = (
        RuntimeConfig.resolve(EngineConfig(), _facts()),
        RuntimeConfig.resolve(EngineConfig(), _facts("cuda")),
    )
    assert (cpu.chunked_prefill_size, gpu.chunked_prefill_size) == (1024, 8192)
    assert RuntimeConfig.resolve(EngineConfig(chunked_prefill_size=-1), _facts()).chunked_prefill_size is None
    assert cpu.context_length == 8192 and cpu.max_running_requests == 256
    assert RuntimeConfig.resolve(EngineConfig(), _facts(context=None)).context_length == 4096


def test_a_pool_smaller_than_a_page_is_an_error_naming_the_options() -> None:
    with pytest.raises(ValueError, match="max-total-tokens"):
        RuntimeConfig.resolve(EngineConfig(page_size=64), _facts(free=1000))
