"""Greedy output is token-identical to transformers' generate in float32 (DESIGN.md, "How we test").

Every required architecture, under both implementations, with prompts submitted together and staggered,
with chunked prefill at a small chunk size, and with a KV pool small enough to force retraction.
"""

from __future__ import annotations

import os

import pytest

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.testing import cached_model_folder
from tests.parity_utils import assert_greedy_match, drive_core, hf_greedy, random_prompts

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]
NATIVE = {"llama", "qwen2", "qwen3", "mistral"}
IMPLS = ["native", "transformers"]
LENGTHS = [3, 9, 17, 30, 45, 64, 90, 130]  # crosses the tiny models' sliding windows (16 and 32)
MAX_NEW = 20

CASES = [(a, i) for a in ARCHS for i in IMPLS if i == "transformers" or a in NATIVE]


def _core(path, impl: str, **options) -> EngineCore:
    options.setdefault("disable_radix_cache", os.environ.get("RADIXLM_TEST_DISABLE_CACHE") == "1")
    cfg = EngineConfig(model_path=str(path), model_impl=impl, dtype="float32", inline_core=True, **options)
    return EngineCore(cfg)


def _run(core: EngineCore, prompts: list[list[int]], stagger: int = 0) -> list[list[int]]:
    """Greedy ids per prompt; KV accounting is checked after every step (see drive_core)."""
    params = {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
    return drive_core(core, prompts, params, stagger)["ids"]


def _compare(path, prompts, results, label):
    for i, p in enumerate(prompts):
        ref, margins = hf_greedy(path, p, MAX_NEW)
        assert_greedy_match(results[i], ref, margins, f"{label} prompt {i} (len {len(p)})")


@pytest.mark.parametrize("arch,impl", CASES)
def test_parity_together_and_staggered(arch: str, impl: str) -> None:
    path = cached_model_folder(arch, "tiny")
    core = _core(path, impl, max_total_tokens=8192)
    prompts = random_prompts(core.runner.vocab_size, LENGTHS, seed=1)
    _compare(path, prompts, _run(core, prompts), f"{arch}/{impl} together")
    prompts2 = random_prompts(core.runner.vocab_size, LENGTHS[::-1], seed=2)
    _compare(path, prompts2, _run(core, prompts2, stagger=3), f"{arch}/{impl} staggered")


@pytest.mark.parametrize("arch,impl", CASES)
def test_parity_chunked_prefill_and_retraction(arch: str, impl: str) -> None:
    path = cached_model_folder(arch, "tiny")
    # chunks of 16 tokens; a pool that cannot hold every request at once, so some are retracted and resumed
    core = _core(path, impl, max_total_tokens=400, chunked_prefill_size=16)
    prompts = random_prompts(core.runner.vocab_size, LENGTHS, seed=3)
    results = _run(core, prompts, stagger=1)
    _compare(path, prompts, results, f"{arch}/{impl} chunked+small pool")
    assert core.scheduler.num_retractions > 0, "the pool was meant to be small enough to force retraction"


EXTRA_ARCHS = ["gemma2", "gpt_neox", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "olmo2", "granite"]


@pytest.mark.parametrize("arch", EXTRA_ARCHS)
def test_any_decoder_through_transformers_backend(arch: str) -> None:
    """Softcapping (gemma2), parallel residual + partial rotary + biases (gpt_neox), partial rotary (phi3),
    MoE with checkpoint converters (mixtral, qwen2_moe), post-norms (olmo2), logit/attention multipliers (granite)."""
    path = cached_model_folder(arch, "tiny")
    core = _core(path, "auto", max_total_tokens=4000, chunked_prefill_size=16)
    assert core.runner.choice.impl == "transformers"
    prompts = random_prompts(core.runner.vocab_size, LENGTHS, seed=5)
    _compare(path, prompts, _run(core, prompts, stagger=2), f"{arch}/transformers")


@pytest.mark.parametrize("arch,impl", CASES + [(a, "transformers") for a in ("gpt_neox", "qwen2_moe")])
def test_parity_with_packed_linears(arch: str, impl: str) -> None:
    """Every linear (and the LM head) on oneDNN's prepacked kernel, whatever this machine measured."""
    path = cached_model_folder(arch, "tiny")
    core = _core(path, impl, max_total_tokens=8192, linear_kernel="packed")
    if core.runner.linear_kernels.reason:
        pytest.skip(core.runner.linear_kernels.reason)
    assert core.runner.linear_kernels.packed_modules > 0
    prompts = random_prompts(core.runner.vocab_size, LENGTHS, seed=7)
    _compare(path, prompts, _run(core, prompts, stagger=2), f"{arch}/{impl} packed linears")
