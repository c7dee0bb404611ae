"""The Transformers modeling backend: causal.py (the model wrapper and the registered attention function),
tp_plan.py (tensor parallelism from the model class's base_model_tp_plan)."""

from radixlm.model.transformers_backend.causal import TransformersCausalLM

__all__ = ["TransformersCausalLM"]
