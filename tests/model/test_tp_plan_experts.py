"""Fused experts named only by an expert-parallel plan (transformers >= 5.25) are split by columns."""

import pytest
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from radixlm.model.loader import ModelLoadError
from radixlm.model.transformers_backend.tp_plan import TPSharding


def _config(**plans) -> Qwen3MoeConfig:
    cfg = Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_hidden_layers=1,
    )
    for name, plan in plans.items():
        setattr(cfg, name, plan)
    return cfg


_TP = {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"}


def test_expert_parallel_entries_become_the_column_split() -> None:
    ep = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.gate_up_proj_bias": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
        "layers.*.mlp.gate": "ep_router",
    }
    cfg = _config(base_model_tp_plan=_TP, base_model_ep_plan=ep)
    tp = TPSharding(Qwen3MoeForCausalLM, cfg, cfg, rank=1, size=2)
    assert tp.style_of("layers.0.mlp.experts.gate_up_proj") == "packed_colwise"
    assert tp.style_of("layers.0.mlp.experts.down_proj") == "rowwise"
    assert tp.is_experts("layers.0.mlp.experts")
    assert tp.style_of("layers.0.mlp.gate") is None  # the router stays whole
    assert tp.local_config.moe_intermediate_size == 16


def test_a_tp_plan_entry_wins_over_the_expert_parallel_one() -> None:
    tp_plan = {**_TP, "layers.*.mlp.experts.down_proj": "rowwise"}
    ep = {"layers.*.mlp.experts.down_proj": "some_future_style"}
    cfg = _config(base_model_tp_plan=tp_plan, base_model_ep_plan=ep)
    assert (
        TPSharding(Qwen3MoeForCausalLM, cfg, cfg, rank=0, size=2).style_of("layers.3.mlp.experts.down_proj")
        == "rowwise"
    )


@pytest.mark.parametrize(
    "pattern,style",
    [("layers.*.mlp.experts.w13", "grouped_gemm"), ("layers.*.mlp.experts", "ep_all_to_all_v9")],
)
def test_an_expert_parallel_entry_without_a_column_split_is_refused_by_name(pattern: str, style: str) -> None:
    cfg = _config(base_model_tp_plan=_TP, base_model_ep_plan={pattern: style})
    with pytest.raises(ModelLoadError, match=f"Qwen3MoeForCausalLM: expert-parallel plan entry '{pattern}'"):
        TPSharding(Qwen3MoeForCausalLM, cfg, cfg, rank=0, size=2)
