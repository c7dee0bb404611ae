"""Tensor parallelism for Transformers models, read from the config's `base_model_tp_plan`.

The model is built from a *local* config: attention heads, KV heads and the MLP width divided by tp_size,
head_dim pinned to its global value. transformers' own modules then come out at one rank's shapes, and
their forward code, which reshapes with the config's counts, computes this rank's heads. The checkpoint's
full tensors are sliced per plan entry as they load:

    colwise                 weight rows (and bias) split: this rank's heads or MLP columns
    rowwise                 weight columns split; the output is all-reduced; the bias is added on rank 0
    replicated*             kept whole (per-head q/k norms)
    colwise_gather_output   on a fused [q | k | v] or [gate | up] projection (Phi-3): split per part, as
                            colwise, since nothing after it mixes heads
    rowwise_split_input     its partner after such a projection: as rowwise
    packed_colwise          fused MoE experts' [E, gate | up, hidden] tensor: each half split, as colwise
    rowwise (on experts)    their [E, hidden, inter] down tensor: the inter columns split
    moe_tp_experts          the experts module: every rank runs every expert on its columns, so its output
                            is a partial sum, all-reduced (the router stays whole and routes alike on every rank)

transformers 5.25 moved fused experts out of the TP plan into `base_model_ep_plan` (expert parallelism:
`grouped_gemm` tensors, an `ep_dispatch_experts` module). Those entries are read as the three experts rows
above: every rank keeps every expert and splits its columns, so the work stays even whatever the router picks.

Anything else (a norm across all heads behind a gathered projection, interleaved gate/up experts, an entry
this file does not know) is refused at start, naming the class and the entry. The embedding and LM head
are split by vocabulary rows whatever the plan says (vocab_parallel.py); every rank gathers the same logits.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from radixlm.model.loader import ModelLoadError

_COLWISE = {"colwise", "colwise_gather_output", "packed_colwise"}
_ROWWISE = {"rowwise", "rowwise_split_input"}
_REPLICATED = {"replicated_with_grad_allreduce", "replicate", "replicated", "embedding_rowwise"}
_EXPERTS = {"moe_tp_experts"}
# The config fields that size what the split divides: MLP widths (dense and per expert).
_WIDTHS = ("intermediate_size", "moe_intermediate_size")


@dataclass(frozen=True)
class Shard:
    kind: str  # "col" or "row"
    parts: tuple[int, ...]  # the global output sizes of a fused projection's parts (col), else (out,)
    # Which dims of a weight hold (out, in): (-2, -1) for nn.Linear [out, in] and experts [E, out, in];
    # (-1, -2) for experts stored transposed [E, in, out].
    out_dim: int = -2
    in_dim: int = -1


class TPSharding:
    """One rank's view of a Transformers model's tensor-parallel split."""

    def __init__(self, model_cls: type, config, text_config, rank: int, size: int) -> None:
        self.rank, self.size = rank, size
        self.model_name = model_cls.__name__
        cfg = text_config
        self.plan: dict[str, str] = dict(getattr(cfg, "base_model_tp_plan", None) or {})
        ep_plan = dict(getattr(cfg, "base_model_ep_plan", None) or {})
        self.plan.update(_experts_from_ep_plan(self.model_name, ep_plan, self.plan))
        if not self.plan:
            raise ModelLoadError(
                f"{self.model_name} has no base_model_tp_plan in its config, so radixlm cannot split it across "
                f"{size} ranks; use tp_size 1"
            )
        for pattern, style in self.plan.items():
            if style not in _COLWISE | _ROWWISE | _REPLICATED | _EXPERTS:
                raise ModelLoadError(
                    f"{self.model_name}: tensor-parallel plan entry {pattern!r}: {style!r} is not supported "
                    "by radixlm yet (supported: colwise, rowwise, replicated, colwise_gather_output / "
                    "rowwise_split_input on fused q|k|v or gate|up projections, and packed_colwise / rowwise "
                    "/ moe_tp_experts on fused MoE experts)"
                )
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.intermediate = getattr(cfg, "intermediate_size", None)
        self.widths = {f: getattr(cfg, f) for f in _WIDTHS if isinstance(getattr(cfg, f, None), int)}
        for what, n in (("attention heads", self.heads), ("KV heads", self.kv_heads)):
            if n % size:
                raise ModelLoadError(
                    f"{self.model_name}: {n} {what} do not split across {size} tensor-parallel ranks"
                )
        for field, width in self.widths.items():
            if width % size:
                raise ModelLoadError(f"{self.model_name}: {field} {width} does not split across {size} ranks")
        self._patterns = [(re.compile(_regex(p)), s) for p, s in self.plan.items()]
        self.local_config = self._local(config, text_config)

    def _local(self, config, text_config):
        """A copy of the config with one rank's counts (the text config's, for a composite config)."""
        local = copy.deepcopy(config)
        text = local.get_text_config() if hasattr(local, "get_text_config") else local
        text.num_attention_heads = self.heads // self.size
        text.num_key_value_heads = self.kv_heads // self.size
        text.head_dim = self.head_dim  # else hidden_size // (local heads) would double it
        for field, width in self.widths.items():
            setattr(text, field, width // self.size)
        return local

    def style_of(self, module_name: str) -> str | None:
        """The plan entry for a module of the base model (names relative to it, e.g. layers.3.mlp.up_proj)."""
        for rx, style in self._patterns:
            if rx.fullmatch(module_name):
                return style
        return None

    def is_experts(self, module_name: str) -> bool:
        return self.style_of(module_name) in _EXPERTS

    def shard_for(self, module_name: str, full_out: int) -> Shard | None:
        style = self.style_of(module_name)
        if style is None or style in _REPLICATED | _EXPERTS:
            return None
        if style in _ROWWISE:
            return Shard("row", (full_out,))
        if style == "colwise":
            return Shard("col", (full_out,))
        if style == "packed_colwise":  # [gate | up] fused: split each half
            if full_out % 2:
                raise ModelLoadError(f"{self.model_name}: {module_name!r} is packed but has {full_out} rows")
            return Shard("col", (full_out // 2, full_out // 2))
        # colwise_gather_output: only where the projection is a fusion of per-head or per-column parts
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if full_out == q + 2 * kv:
            return Shard("col", (q, kv, kv))
        if self.intermediate is not None and full_out == 2 * self.intermediate:
            return Shard("col", (self.intermediate, self.intermediate))
        raise ModelLoadError(
            f"{self.model_name}: plan entry for {module_name!r} gathers its output across ranks "
            "(colwise_gather_output), which radixlm does not support on an unfused projection yet; "
            "use tp_size 1"
        )

    def expert_shard_for(self, experts: nn.Module, param_name: str, full: torch.Tensor) -> Shard | None:
        """The shard of a fused experts tensor (`layers.N.mlp.experts.gate_up_proj` and its bias...)."""
        attr = param_name.rpartition(".")[2]
        weight_name = param_name[: -len("_bias")] if attr.endswith("_bias") else param_name
        style = self.style_of(weight_name)
        if style is None:
            return None
        transposed = bool(getattr(experts, "is_transposed", False))
        out_dim, in_dim = (-1, -2) if transposed else (-2, -1)
        if attr.endswith("_bias"):  # [E, out]: only the out dim exists
            out_dim, in_dim = -1, -1
        shard = self.shard_for(weight_name, full.shape[out_dim])
        return None if shard is None else Shard(shard.kind, shard.parts, out_dim, in_dim)

    def validate(self, base_model: nn.Module) -> None:
        """Refuse, before any weight loads, a plan entry this split cannot honour on this model."""
        for name, mod in base_model.named_modules():
            if isinstance(mod, nn.Linear) and self.style_of(name) == "colwise_gather_output":
                self.shard_for(name, mod.out_features * self.size)
            if self.style_of(name) in _EXPERTS and not getattr(mod, "is_concatenated", True):
                raise ModelLoadError(
                    f"{self.model_name}: {name!r} stores its experts' gate and up columns interleaved, which "
                    "radixlm does not split across tensor-parallel ranks yet; use tp_size 1"
                )

    def slice_tensor(self, shard: Shard, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full checkpoint tensor of a sharded linear or experts (weight or bias)."""
        is_bias = param_name.endswith("bias")
        out_dim = -1 if is_bias else shard.out_dim
        if shard.kind == "row":
            if is_bias:  # summed over ranks by the all-reduce: added once
                return tensor if self.rank == 0 else torch.zeros_like(tensor)
            return _narrow_even(tensor, shard.in_dim, self.rank, self.size)
        pieces, offset = [], 0
        for part in shard.parts:
            pieces.append(_narrow_even(tensor.narrow(out_dim, offset, part), out_dim, self.rank, self.size))
            offset += part
        if offset != tensor.shape[out_dim]:
            raise ModelLoadError(
                f"{param_name}: {tensor.shape[out_dim]} rows, but the plan's parts add up to {offset}"
            )
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, out_dim)

    def install_all_reduce(self, base_model: nn.Module) -> int:
        """Sum each row-parallel linear's partial outputs over the ranks; returns how many were hooked."""
        import torch.distributed as dist

        def all_reduce(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(output)
            return output

        n = 0
        for name, mod in base_model.named_modules():
            style = self.style_of(name)
            if (isinstance(mod, nn.Linear) and style in _ROWWISE) or style in _EXPERTS:
                mod.register_forward_hook(all_reduce)
                n += 1
        if n == 0:
            raise ModelLoadError(f"{self.model_name}: the tensor-parallel plan matched no row-parallel linear")
        return n


# Expert-parallel styles (transformers >= 5.25) and the column split radixlm runs in their place.
_EP_MODULE_STYLES = {"ep_dispatch_experts": "moe_tp_experts", "moe_tp_experts": "moe_tp_experts"}
_EP_TENSOR_STYLES = {"gate_up_proj": "packed_colwise", "down_proj": "rowwise"}
_EP_IGNORED = {"ep_router"}  # the router stays whole on every rank


def _experts_from_ep_plan(
    model_name: str, ep_plan: dict[str, str], tp_plan: dict[str, str]
) -> dict[str, str]:
    """TP plan entries for the fused experts an expert-parallel plan names and the TP plan does not."""
    entries: dict[str, str] = {}
    for pattern, style in ep_plan.items():
        if pattern in tp_plan or style in _EP_IGNORED:
            continue
        attr = pattern.rpartition(".")[2]
        if style in _EP_MODULE_STYLES:
            entries[pattern] = _EP_MODULE_STYLES[style]
        elif style == "grouped_gemm" and attr.endswith("_bias"):
            continue  # a bias follows its weight's entry (TPSharding.expert_shard_for)
        elif style == "grouped_gemm" and attr in _EP_TENSOR_STYLES:
            entries[pattern] = _EP_TENSOR_STYLES[attr]
        else:
            raise ModelLoadError(
                f"{model_name}: expert-parallel plan entry {pattern!r}: {style!r} has no tensor-parallel "
                f"equivalent in radixlm yet (known: grouped_gemm on {sorted(_EP_TENSOR_STYLES)}, "
                f"{sorted(_EP_MODULE_STYLES)} on the experts module); use tp_size 1"
            )
    return entries


def _regex(pattern: str) -> str:
    return re.escape(pattern).replace(r"\*", r"\d+")


def _narrow_even(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = t.shape[dim]
    if n % size:
        raise ModelLoadError(f"a tensor of {n} along dim {dim} does not split across {size} ranks")
    step = n // size
    return t.narrow(dim, rank * step, step)
