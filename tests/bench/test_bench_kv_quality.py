"""`radixlm bench quant --kv-cache-dtypes`: the KV-dtype quality rows on the tiny model (bf16 weights),
the reference row agreeing with itself, fp8 holding twice the tokens per byte, and the table printed."""

from __future__ import annotations

import json

from radixlm.bench.cli import main
from radixlm.testing import cached_model_folder


def test_bench_kv_quality_smoke(tmp_path, capsys) -> None:
    out = tmp_path / "quant.json"
    model = str(cached_model_folder("qwen2", "tiny"))
    argv = ["quant", "--skip-speed", "--skip-quality", "--quality-model", model, "--quality-tokens", "6"]
    assert main([*argv, "--kv-cache-dtypes", "fp8_e5m2", "--json", str(out)]) == 0
    rows = {r["kv_cache_dtype"]: r for r in json.loads(out.read_text())["kv_quality"]}
    assert set(rows) == {"auto", "fp8_e5m2"}
    assert rows["auto"]["greedy_agreement"] == 1.0 and rows["auto"]["identical_prompts"] == 4
    assert 0.0 <= rows["fp8_e5m2"]["greedy_agreement"] <= 1.0
    assert rows["fp8_e5m2"]["kv_capacity_same_memory"] == 2.0  # bf16 model: 2 bytes vs 1 per element
    assert rows["fp8_e5m2"]["perplexity"] > 1.0
    assert "KV cache dtype on the quality model" in capsys.readouterr().out
