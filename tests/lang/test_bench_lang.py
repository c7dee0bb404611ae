"""`radixlm bench lang` end to end on the tiny model: both systems send the same prompts, the language
computes far fewer tokens, and both pick the same labels (float32)."""

from __future__ import annotations

import json

import pytest

from radixlm.bench.cli import main
from radixlm.testing import cached_model_folder


@pytest.mark.slow
def test_bench_lang_runs(tmp_path, capsys) -> None:
    out = tmp_path / "lang.json"
    args = ["lang", "--model-path", str(cached_model_folder("qwen2")), "--dtype", "float32"]
    args += ["--num-questions", "4", "--prefix-len", "300", "--gen-len", "4", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    lang, api = report["results"]
    assert report["workload"]["prefix_tokens"] >= 300
    assert lang["prompt_tokens"] == api["prompt_tokens"]  # the same calls, by the servers' own count
    # Without the cache every one of the 5 calls per question computes its whole prompt.
    assert api["computed_tokens"] >= api["prompt_tokens"] - 5 * 4
    assert lang["computed_tokens"] * 3 < api["computed_tokens"]
    assert report["same_labels"] == 4
    assert "radixlm bench lang" in capsys.readouterr().out
