"""`radixlm bench quant` end to end on the tiny model: every method's rows, ratios against bf16 from the
same run, smaller weights for int8 / int4, and the JSON it writes."""

from __future__ import annotations

import json

from radixlm.bench.cli import main
from radixlm.testing import cached_model_folder


def test_bench_quant_smoke(tmp_path, capsys) -> None:
    out = tmp_path / "quant.json"
    argv = ["quant", "--speed-model", str(cached_model_folder("qwen2", "tiny")), "--skip-quality"]
    argv += ["--decode-tokens", "4", "--prompt-len", "8", "--rounds", "2", "--batch-sizes", "1,4"]
    assert main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["speed"]
    assert [(r["method"], r["batch"]) for r in rows] == [
        (m, b) for b in (1, 4) for m in ("none", "int8", "int4")
    ]
    assert all(r["decode_tok_s"] > 0 for r in rows)
    assert all(r["ratio_to_bf16"] == 1.0 for r in rows if r["method"] == "none")
    # Paired: the median of per-round ratios, each round's rate over bf16's in that round.
    base = {r["batch"]: r["round_rates"] for r in rows if r["method"] == "none"}
    for r in rows:
        assert len(r["round_rates"]) == 2 and max(r["round_rates"]) == r["decode_tok_s"]
        pairs = sorted(a / b for a, b in zip(r["round_rates"], base[r["batch"]]))
        assert abs(r["paired_ratio"] - (pairs[0] + pairs[1]) / 2) < 1e-9
    mib = {r["method"]: r["weight_mib"] for r in rows}
    # (Not below bf16 here: the tiny model's tied embedding dominates, and it stays float beside its packed
    # copy that the head multiplies with.)
    assert 0 < mib["int4"] < mib["int8"]
    assert "x bf16" in capsys.readouterr().out
