"""EngineConfig / RuntimeConfig for SGLang and vLLM users: their spellings of options, --context-length
above the model's limit, and --mem-fraction-static with SGLang's meaning (weights plus KV)."""

from __future__ import annotations

import pytest

from radixlm.config import EngineConfig, ModelFacts, RuntimeConfig

GiB = 1 << 30
PER_TOKEN = 1024


def _facts(free: int = 10 * GiB, total: int | None = 16 * GiB, context: int | None = 2048) -> ModelFacts:
    return ModelFacts("cuda", context, PER_TOKEN, free, total)


def test_dtype_and_model_impl_aliases() -> None:
    assert EngineConfig(dtype="half").dtype == "float16"
    assert EngineConfig(dtype="float").dtype == "float32"
    assert EngineConfig(model_impl="sglang").model_impl == "native"
    assert EngineConfig(model_impl="vllm").model_impl == "native"
    with pytest.raises(ValueError, match="dtype must be one of"):
        EngineConfig(dtype="double")


def test_context_length_above_the_model_limit_is_refused_unless_allowed(monkeypatch) -> None:
    for name in ("RADIXLM_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"--context-length 4096 is above the model's limit of 2048"):
        RuntimeConfig.resolve(EngineConfig(context_length=4096), _facts())
    assert RuntimeConfig.resolve(EngineConfig(context_length=2048), _facts()).context_length == 2048
    allowed = RuntimeConfig.resolve(EngineConfig(context_length=4096, allow_longer_context=True), _facts())
    assert allowed.context_length == 4096
    monkeypatch.setenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")  # SGLang's switch works too
    assert RuntimeConfig.resolve(EngineConfig(context_length=4096), _facts()).context_length == 4096


def test_mem_fraction_static_bounds_weights_plus_kv_like_sglang() -> None:
    # 16 GiB device, 10 GiB free after the weights (so weights and the rest use 6): 0.8 of the total is
    # 12.8 GiB for weights + KV, leaving the pool 12.8 - 6 = 6.8 GiB.
    rt = RuntimeConfig.resolve(EngineConfig(mem_fraction_static=0.8, max_running_requests=10**6), _facts())
    assert rt.kv_capacity == int(10 * GiB - 16 * GiB * 0.2) // PER_TOKEN
    assert "weights + KV" in rt.kv_capacity_reason
    # A fraction the weights already exceed leaves no pool: refused, naming the option.
    with pytest.raises(ValueError, match="mem-fraction-static"):
        RuntimeConfig.resolve(EngineConfig(mem_fraction_static=0.3), _facts())
    # Unset, the default is unchanged: a fraction of the free memory.
    default = RuntimeConfig.resolve(EngineConfig(max_running_requests=10**6), _facts())
    assert default.kv_capacity == int(10 * GiB * 0.85) // PER_TOKEN
