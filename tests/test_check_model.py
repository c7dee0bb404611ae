"""`radixlm check-model`: a clear verdict for every architecture the suite builds, and for what fails."""

from __future__ import annotations

import pytest

from radixlm.check_model import inspect, main
from radixlm.testing import ARCHITECTURES, cached_model_folder


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_test_architecture_gets_a_verdict(arch: str) -> None:
    report = inspect(str(cached_model_folder(arch, "tiny")))
    fields = dict(report.lines)
    assert fields["verdict"] == "runs", report.render()
    assert fields["implementation"].split(":")[0] in ("native", "transformers")
    assert fields["tensor parallel"].startswith("tp_size 1")
    assert fields["chat template"].startswith("yes")
    assert fields["quantization"] == "none"


def test_a_split_the_plan_cannot_honour_is_named_per_size() -> None:
    fields = dict(inspect(str(cached_model_folder("olmo2", "tiny"))).lines)
    assert fields["tensor parallel"] == "tp_size 1 (from base_model_tp_plan)"
    assert "gathers its output across ranks" in fields["tensor parallel 2"]


def test_parity_runs_on_request(capsys) -> None:
    assert main([str(cached_model_folder("qwen3", "tiny")), "--parity"]) == 0
    out = capsys.readouterr().out
    assert "greedy token-identical to transformers" in out
    assert "verdict" in out and "runs" in out


def test_a_model_that_cannot_run_says_why_and_exits_non_zero(tmp_path, capsys) -> None:
    from radixlm.testing import census

    census.build_folder("falcon", "FalconForCausalLM", tmp_path)
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FalconForCausalLM does not support transformers' attention interface" in out
    assert "does not run" in out
    assert main([str(tmp_path / "missing")]) == 1
    assert "no such folder" in capsys.readouterr().out
