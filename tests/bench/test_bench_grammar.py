"""`radixlm bench offline --json-schema`: the constrained row runs on the same requests and decodes exactly
what they asked for (the default schema cannot complete sooner), and the cost headline is printed."""

from __future__ import annotations

import json
import pathlib

from radixlm.bench.cli import main as bench_main
from radixlm.testing import cached_model_folder


def test_offline_with_a_json_schema_on_every_request(tmp_path: pathlib.Path, capsys) -> None:
    out = tmp_path / "offline.json"
    argv = ["offline", "--model-path", str(cached_model_folder("qwen2", "tiny")), "--num-requests", "4"]
    argv += ["--min-prompt", "8", "--max-prompt", "24", "--min-output", "4", "--max-output", "8"]
    argv += ["--skip-hf-generate", "--skip-generate-batch", "--json-schema", "default", "--json", str(out)]
    assert bench_main(argv) == 0
    data = json.loads(out.read_text())
    systems = {r["system"]: r for r in data["results"]}
    assert set(systems) == {"radixlm", "radixlm + json_schema"}
    requested = data["workload"]["requested_output_tokens"]
    for r in systems.values():
        assert r["output_tokens"] == requested and r["short_requests"] == 0 and r["output_tok_per_s"] > 0
    assert "json_schema on every request:" in capsys.readouterr().out
