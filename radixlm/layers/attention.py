"""RadixAttention: the one attention layer that native models and the Transformers backend both call.

It writes the step's new K/V into the KV pool at `forward_batch.out_cache_loc`, then asks the attention
backend to attend each query over its request's whole KV history (read through req_to_token). Whether the
history came from a prefix-cache hit, an earlier chunk or earlier decodes makes no difference here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from radixlm.layers import compiled_attention

if TYPE_CHECKING:
    from radixlm.model.forward_batch import ForwardBatch

_FROM_LAYER = object()  # sentinel: "use the value this layer was built with"


class RadixAttention(nn.Module):
    def __init__(
        self,
        layer_id: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scaling: float,
        *,
        v_head_dim: int | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        attention_chunk: int | None = None,
        causal: bool = True,
    ) -> None:
        """causal=False: bidirectional (encoders); the backend then needs each prompt whole in one step."""
        super().__init__()
        self.causal = causal
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.scaling = scaling
        self.sliding_window = sliding_window if sliding_window and sliding_window > 0 else None
        self.softcap = softcap if softcap else None
        self.attention_chunk = attention_chunk if attention_chunk and attention_chunk > 0 else None

    # Set by model/compiled_forward.py when this layer runs inside a compiled graph: its key for the
    # radix_attention op (layers/compiled_attention.py). None: always eager.
    compile_key: int | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        forward_batch: ForwardBatch | None,
        **overrides: object,
    ) -> torch.Tensor:
        if self.compile_key is not None and torch.compiler.is_compiling():
            if overrides:  # the op carries no per-call options; the compiled forward never passes any
                raise NotImplementedError(f"compiled attention takes no per-call options ({sorted(overrides)})")
            return compiled_attention.radix_attention(q, k, v, self.compile_key)
        if forward_batch is None:
            raise RuntimeError("RadixAttention: an eager call needs the step's ForwardBatch")
        return self.eager_forward(q, k, v, forward_batch, **overrides)  # type: ignore[arg-type]

    def eager_forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        forward_batch: ForwardBatch,
        *,
        scaling: float | None = None,
        sliding_window: int | None | object = _FROM_LAYER,
        softcap: float | None | object = _FROM_LAYER,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, H*D] or [T, H, D]; k, v: [T, Hkv*D] or [T, Hkv, D]. Returns [T, H * v_head_dim].

        The keyword overrides exist for the Transformers backend, which honours what the model's own
        attention module passes for this call over what the config said at build time.
        """
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.v_head_dim)
        forward_batch.kv_pool.write(self.layer_id, forward_batch.out_cache_loc, k, v)
        out = forward_batch.attn_backend.forward(
            q,
            forward_batch,
            layer_id=self.layer_id,
            scaling=self.scaling if scaling is None else scaling,
            sliding_window=self.sliding_window if sliding_window is _FROM_LAYER else (sliding_window or None),
            softcap=self.softcap if softcap is _FROM_LAYER else (softcap or None),
            k=k,
            v=v,
            sinks=sinks,
            chunk=self.attention_chunk,
            causal=self.causal,
        )
        return out.reshape(T, self.num_heads * self.v_head_dim)
