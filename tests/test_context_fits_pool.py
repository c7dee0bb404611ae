"""Issue 10, hole 7 (the engine's half): a KV pool smaller than the context length let one request
outgrow the pool mid-answer and end in an abort. Now the model's own context is clamped to the pool, and
an explicit --context-length that does not fit is refused at start, naming the options."""

from __future__ import annotations

import logging

import pytest

from radixlm.config import EngineConfig, ModelFacts, RuntimeConfig

FACTS = ModelFacts("cpu", 8192, 1024, 64 << 30)


def test_the_models_context_is_clamped_to_the_pool_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="radixlm"):
        rt = RuntimeConfig.resolve(EngineConfig(max_total_tokens=1000), FACTS)
    assert rt.kv_capacity == 1000 and rt.context_length == 1000
    assert "fewer than the model's context length 8192" in caplog.text


def test_whole_pages_bound_the_clamped_context() -> None:
    rt = RuntimeConfig.resolve(EngineConfig(max_total_tokens=1001, page_size=16), FACTS)
    assert rt.kv_capacity == 992 and rt.context_length == 992


def test_an_explicit_context_longer_than_the_pool_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"--context-length 4096 .* KV pool \(1000 tokens.*--max-total-tokens"
    ):
        RuntimeConfig.resolve(EngineConfig(max_total_tokens=1000, context_length=4096), FACTS)


def test_a_pool_that_holds_the_context_changes_nothing() -> None:
    rt = RuntimeConfig.resolve(EngineConfig(max_total_tokens=20000), FACTS)
    assert rt.context_length == 8192
