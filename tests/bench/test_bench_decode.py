"""`radixlm bench decode`: the bandwidth bound's parts and a run of every system row on the tiny model."""

from __future__ import annotations

import json

import torch

from radixlm.bench.cli import main
from radixlm.bench.decode import best_rate, rate_between, two_point_rate, weight_bytes_per_token
from radixlm.testing import cached_model_folder


def test_weight_bytes_count_a_tied_table_once_and_skip_an_untied_input_table() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    for tied in (True, False):
        model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=tied)).float()
        every = {id(p): p for p in model.parameters()}
        total = sum(p.numel() * 4 for p in every.values())
        table = 100 * 16 * 4
        assert weight_bytes_per_token(model) == (total if tied else total - table)


def test_two_point_rate_excludes_what_one_token_costs() -> None:
    times = {1: 5.0, 11: 7.0}  # 5 s of start-up and prefill, then 0.2 s per token
    assert two_point_rate(times.__getitem__, 10) == 10 / 2.0


def test_best_rate_skips_a_round_that_measured_nothing() -> None:
    nan = float("nan")
    assert best_rate([nan, 3.0, 2.0]) == 3.0
    assert best_rate([nan]) != best_rate([nan])  # nan only when no round measured
    assert rate_between(2.0, 2.0, 4) != rate_between(2.0, 2.0, 4)  # a long run no slower: nan, not inf
    assert rate_between(1.0, 3.0, 4) == 2.0


def test_bench_decode_runs_every_row(tmp_path) -> None:
    out = tmp_path / "decode.json"
    model = str(cached_model_folder("qwen2", "tiny"))
    args = [
        "decode",
        "--model-path",
        model,
        # 32 tokens and two rounds: at 4 tokens one round, CI once timed the 5-token run no slower
        # than the 1-token run (a few ms apart on the tiny model) and the rate came out nan.
        "--decode-tokens",
        "32",
        "--rounds",
        "2",
        "--impls",
        "auto,transformers",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    report = json.loads(out.read_text())
    systems = [r["system"] for r in report["rows"]]
    assert systems == ["radixlm (native)", "radixlm (transformers)", "transformers generate"]
    assert all(r["decode_tok_s"] > 0 for r in report["rows"])
    assert report["bandwidth_gb_s"] > 0 and report["bound_tok_s"] > 0
    assert torch.get_num_threads() == report["threads"]
