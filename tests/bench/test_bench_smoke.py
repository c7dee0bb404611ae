"""Smoke runs of `radixlm bench`: every system runs on the tiny model and the numbers are sane.

Not a timed test: tiny model, 4 requests, a few tokens each. It checks that the bench code runs end to end,
that every system is reported with tok/s > 0, and that token counts are exactly what was requested.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

import radixlm
from radixlm.bench.cli import main as bench_main
from radixlm.bench.prefix import GENERATE_BATCH, NO_CACHE, PrefixOptions, run_prefix
from radixlm.config import EngineConfig
from radixlm.testing import cached_model_folder

HAS_SERVER = importlib.util.find_spec("radixlm.launch_server") is not None


@pytest.fixture(scope="module")
def tiny_model() -> str:
    return str(cached_model_folder("qwen2", "tiny"))


def _check(result: dict, requests: int, requested_tokens: int) -> None:
    assert result["requests"] == requests
    assert result["requested_tokens"] == requested_tokens
    assert result["output_tokens"] == requested_tokens, result
    assert result["short_requests"] == 0
    assert result["complete"]
    assert result["seconds"] > 0
    assert result["output_tok_per_s"] > 0


def test_offline_smoke(tiny_model: str, tmp_path: pathlib.Path, capsys) -> None:
    out = tmp_path / "offline.json"
    argv = ["offline", "--model-path", tiny_model, "--num-requests", "4", "--min-prompt", "8"]
    argv += ["--max-prompt", "24", "--min-output", "2", "--max-output", "6", "--hf-batch-sizes", "2,4"]
    argv += ["--json", str(out)]
    assert bench_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["radixlm"].startswith(radixlm.__version__)  # results name their code
    requested = data["workload"]["requested_output_tokens"]
    systems = {r["system"]: r for r in data["results"]}
    assert set(systems) == {
        "radixlm",
        "transformers generate (batch 2)",
        "transformers generate (batch 4)",
        "transformers generate_batch (CB)",
    }
    for r in systems.values():
        _check(r, 4, requested)
    # A static batch decodes its longest request's length for every row: extra tokens are not counted.
    assert systems["transformers generate (batch 4)"]["generated_tokens"] >= requested
    assert systems["radixlm"]["radixlm_ratio"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "radixlm bench offline" in printed and "out tok/s" in printed


@pytest.mark.slow  # about 50 s; CI time
def test_prefix_smoke(tiny_model: str) -> None:
    config = EngineConfig(model_path=tiny_model, dtype="bfloat16", log_level="warning")
    opts = PrefixOptions(
        num_groups=2,
        group_size=2,
        prefix_len=48,
        question_len=8,
        output_len=3,
        num_conversations=2,
        num_turns=2,
        first_turn_len=24,
        turn_len=8,
        hf_batch_size=2,
    )
    shared, multi = run_prefix(config, opts, log=lambda _: None)
    expected = {"radixlm", NO_CACHE, "transformers generate (batch 2)", GENERATE_BATCH}
    for report, requests in ((shared, 4), (multi, 4)):
        systems = {r.system: r.to_dict() for r in report.results}
        assert set(systems) == expected
        for r in systems.values():
            _check(r, requests, 3 * requests)
        assert "radixlm" in report.table()
    ref = {r.system: r for r in shared.results}
    # 2 groups x 2 requests sharing 48 tokens: the radix cache must find some of it, the disabled one none.
    assert ref["radixlm"].extra["cached_tokens"] > 0
    assert ref[NO_CACHE].extra["cached_tokens"] == 0
    # Multi-turn prompts resend the history: turn 2 is turn 1's prompt + 3 output + 8 new tokens.
    assert {r.prompt_tokens for r in multi.results} == {2 * 24 + 2 * (24 + 3 + 8)}


@pytest.mark.skipif(not HAS_SERVER, reason="radixlm/launch_server.py does not exist yet")
def test_serving_smoke(tiny_model: str, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "serving.json"
    argv = ["serving", "--backend", "radixlm", "--model-path", tiny_model, "--num-requests", "4"]
    argv += ["--min-prompt", "8", "--max-prompt", "24", "--min-output", "2", "--max-output", "6"]
    argv += ["--request-rate", "20", "--server-timeout", "120", "--json", str(out)]
    assert bench_main(argv) == 0
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert result["system"] == "radixlm"
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["output_tokens"] == data["workload"]["requested_output_tokens"]
    assert result["prompt_tokens"] == data["workload"]["prompt_tokens"]
    assert result["output_tok_per_s"] > 0
    assert result["ttft_ms"]["p50"] > 0 and result["e2e_s"]["p99"] >= result["e2e_s"]["p50"]
