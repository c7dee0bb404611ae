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


def test_offline_rounds_give_every_system_its_fastest_round(tiny_model: str, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "offline.json"
    argv = ["offline", "--model-path", tiny_model, "--num-requests", "3", "--min-prompt", "8"]
    argv += ["--max-prompt", "16", "--min-output", "2", "--max-output", "4", "--hf-batch-sizes", "3"]
    argv += ["--rounds", "3", "--json", str(out)]
    assert bench_main(argv) == 0
    data = json.loads(out.read_text())
    requested = data["workload"]["requested_output_tokens"]
    assert len(data["results"]) == 3
    for r in data["results"]:
        _check(r, 3, requested)
        rounds = r["extra"]["round_seconds"]
        assert len(rounds) == 3 and r["seconds"] == min(rounds), r
        assert any("fastest of 3 rounds" in note for note in r["notes"]), r["notes"]
    # every round after the first ran on a flushed cache: no prompt token was a hit
    radixlm_row = next(r for r in data["results"] if r["system"] == "radixlm")
    assert radixlm_row["extra"]["cached_tokens"] == 0


def test_fastest_round_keeps_the_fastest_outputs() -> None:
    from radixlm.bench.common import fastest_round

    times = iter([3.0, 1.0, 2.0])
    out, seconds, rounds = fastest_round(3, lambda: ((s := next(times)) * 10, s))
    assert (out, seconds, rounds) == (10.0, 1.0, [3.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        fastest_round(0, lambda: (None, 0.0))


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
