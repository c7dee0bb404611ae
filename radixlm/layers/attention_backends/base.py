"""The attention backend contract: per-step metadata once, then one call per layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixlm.model.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    @abstractmethod
    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Compute whatever every layer of this step shares and store it on `forward_batch.attn_metadata`."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        forward_batch: ForwardBatch,
        *,
        layer_id: int,
        scaling: float,
        sliding_window: int | None,
        softcap: float | None,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
        chunk: int | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """q: [T, H, D]. causal=False: bidirectional over each span's whole prompt (encoders). The step's K/V are already in the pool; k/v [T, Hkv, D], when given, are the same
        values, which a backend may read instead of gathering them back. sinks [H]: per-head logits that
        join each softmax with no value (attention sinks); chunk: a query sees only its own chunk of that many
        positions (chunked attention). Returns [T, H, Dv]."""
