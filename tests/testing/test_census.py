"""The decoder census (radixlm/testing/census.py): a CI subset of model types, one per mechanism the
Transformers backend had to learn, and the whole census behind the slow marker.

    python -m pytest -m slow tests/testing/test_census.py     # every type; also writes docs/census.md
"""

from __future__ import annotations

import pathlib

import pytest

from radixlm.testing import census

# One type per mechanism: attention sinks (gpt_oss), chunked attention (llama4_text), MLA head sizes
# (deepseek_v2), two attention calls per layer (diffllama), a head module between the decoder and the
# LM head plus a tied decoder bias (bert), a decoder that drops **kwargs (nemotron), per-layer head sizes
# (gemma4_text), fused MoE experts (qwen3_moe).
PASSING = ["gpt_oss", "llama4_text", "deepseek_v2", "diffllama", "bert", "nemotron", "gemma4_text", "qwen3_moe"]
# Refused by name: no attention interface at all (falcon); linear-attention layers (minimax).
REFUSED = {"falcon": "FalconForCausalLM does not support", "minimax": "do not call transformers' attention"}


@pytest.fixture(scope="module")
def types() -> dict[str, str]:
    return dict(census.causal_lm_types())


@pytest.mark.parametrize("model_type", PASSING)
def test_the_type_runs_token_exact_against_transformers(model_type, types, tmp_path) -> None:
    entry = census.run_one(model_type, types[model_type], tmp_path)
    assert entry.verdict == "pass", entry
    assert entry.impl == "transformers"


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_the_type_is_refused_with_the_reason_named(model_type, types, tmp_path) -> None:
    entry = census.run_one(model_type, types[model_type], tmp_path)
    assert entry.verdict == "refused", entry
    assert REFUSED[model_type] in entry.detail


def test_the_table_counts_and_lists_every_entry() -> None:
    entries = [
        census.Entry("a", "AForCausalLM", "pass", "transformers"),
        census.Entry("b", "BForCausalLM", "fail", "transformers", "token 3 differs"),
        census.Entry("c", "CForCausalLM", "refused", detail="no attention interface"),
        census.Entry("d", "DForCausalLM", "not-buildable", detail="its config"),
    ]
    assert census.summary(entries)["buildable"] == 2
    table = census.render_markdown(entries, "x.y")
    assert "**1 of 2 buildable types token-exact (50.0%)**" in table
    assert all(f"| {e.model_type} | {e.class_name} | {e.verdict} |" in table for e in entries)


@pytest.mark.slow
def test_the_whole_census_is_at_least_95_percent_token_exact() -> None:
    import transformers

    entries = census.run_census()
    c = census.summary(entries)
    out = pathlib.Path(__file__).resolve().parents[2] / "docs" / "census.md"
    out.write_text(census.render_markdown(entries, transformers.__version__))
    assert c["pass"] >= 0.95 * c["buildable"], [e for e in entries if e.verdict == "fail"]
