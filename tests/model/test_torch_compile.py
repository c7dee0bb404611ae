"""--enable-torch-compile: the compiled decoder gives transformers' greedy tokens (fp32), and falls back cleanly.

Compiling costs tens of seconds per model on a cold cache, so one architecture runs in the default suite and
the rest of the native family behind `slow` (`python -m pytest -m slow tests/model/test_torch_compile.py`).
"""

from __future__ import annotations

import logging

import pytest
import torch

from radixlm.cli_args import add_engine_args, config_from_args
from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.testing import cached_model_folder
from tests.parity_utils import assert_greedy_match, drive_core, hf_greedy, random_prompts

LENGTHS = [3, 9, 17, 30, 45, 64, 90]  # crosses the tiny models' sliding windows (16 and 32)
MAX_NEW = 16
PARAMS = {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}


def _core(path, impl: str = "native", **options) -> EngineCore:
    cfg = EngineConfig(model_path=str(path), model_impl=impl, dtype="float32", inline_core=True, **options)
    return EngineCore(cfg)


def _check_parity(arch: str, linear_kernel: str = "auto") -> None:
    path = cached_model_folder(arch, "tiny")
    # chunks of 16 and a pool too small for every request at once: chunked prefill, retraction and prefix
    # hits all go through the compiled graphs, with one-token and multi-token steps mixed.
    core = _core(
        path,
        enable_torch_compile=True,
        max_total_tokens=400,
        chunked_prefill_size=16,
        linear_kernel=linear_kernel,
    )
    compiled = core.runner.compiled
    assert compiled is not None
    prompts = random_prompts(core.runner.vocab_size, LENGTHS, seed=11)
    got = drive_core(core, prompts, PARAMS, stagger=2)["ids"]
    assert compiled.failed is None, compiled.failed
    assert compiled._seen == {True, False}, "both graphs (one-token and multi-token steps) should have run"
    for i, p in enumerate(prompts):
        ref, margins = hf_greedy(path, p, MAX_NEW)
        assert_greedy_match(got[i], ref, margins, f"{arch} compiled prompt {i} (len {len(p)})")
    again = drive_core(core, prompts[:3], PARAMS)["ids"]  # the same prompts again: prefix-cache hits
    assert again == got[:3]


def test_compiled_qwen2_matches_transformers() -> None:
    # oneDNN-prepacked linears everywhere: their op (radixlm::packed_linear) inside the graph is covered too
    _check_parity("qwen2", linear_kernel="packed")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_compiled_native_family_matches_transformers(arch: str) -> None:
    _check_parity(arch)


def test_compile_failure_falls_back_to_eager(caplog: pytest.LogCaptureFixture) -> None:
    path = cached_model_folder("qwen2", "tiny")
    prompts = random_prompts(1000, [5, 12], seed=4)
    eager = drive_core(_core(path, max_total_tokens=2048), prompts, PARAMS)["ids"]
    core = _core(path, enable_torch_compile=True, max_total_tokens=2048)

    def refuse(*args: object) -> torch.Tensor:
        raise torch._dynamo.exc.Unsupported("an op the compiler cannot trace")

    core.runner.compiled._compiled = refuse
    with caplog.at_level(logging.WARNING):
        got = drive_core(core, prompts, PARAMS)["ids"]
    assert got == eager
    assert "an op the compiler cannot trace" in (core.runner.compiled.failed or "")
    assert any("torch.compile failed, running eager" in r.getMessage() for r in caplog.records)


def test_transformers_backend_runs_eager_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        core = _core(cached_model_folder("qwen2", "tiny"), "transformers", enable_torch_compile=True)
    assert core.runner.compiled is None
    assert any("no compilable decoder" in r.getMessage() for r in caplog.records)


def test_flags_spelled_as_sglang() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert config_from_args(parser.parse_args(["--enable-torch-compile"])).enable_torch_compile is True
    assert config_from_args(parser.parse_args(["--disable-torch-compile"])).enable_torch_compile is False
    assert config_from_args(parser.parse_args([])).enable_torch_compile is False
