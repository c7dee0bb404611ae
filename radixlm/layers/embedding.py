"""Vocab-parallel token embedding and LM head.

The vocabulary is split into tp_size contiguous ranges of ceil(vocab / tp_size) rows; the last range is
zero-padded. With tp_size 1 this is a plain embedding and a plain bias-free linear head.

    embed:  each rank looks up the ids in its range (others give 0), then an all-reduce sums the ranks
    head:   each rank computes logits for its range, then an all-gather concatenates them (padding cut off)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.layers.linear import check_shape

if TYPE_CHECKING:
    from radixlm.layers.packed_linear import PackedWeight


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is out of range for tp_size {tp_size}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.num_per_rank = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.num_per_rank
        # Rows of the real vocabulary this rank holds (the last rank may hold fewer, or none).
        self.num_real = max(0, min(self.num_per_rank, num_embeddings - self.vocab_start))
        self.weight = nn.Parameter(
            torch.empty(self.num_per_rank, embedding_dim, dtype=params_dtype), requires_grad=False
        )
        # The head's matmul prepacked (layers.packed_linear); lookups keep reading the dense weight.
        self.packed: PackedWeight | None = None
        # The head's matmul on a quantized copy (model.quantization), lookups still on the float rows.
        self.quant = None

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"parameter is not packed, but got shard {shard_id!r}")
        check_shape(loaded_weight, (self.num_embeddings, self.embedding_dim))
        param.data[: self.num_real].copy_(loaded_weight.narrow(0, self.vocab_start, self.num_real))
        param.data[self.num_real :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_range = (local >= 0) & (local < self.num_real)
        out = F.embedding(torch.where(in_range, local, 0), self.weight) * in_range.unsqueeze(-1).to(
            self.weight.dtype
        )
        import torch.distributed as dist

        dist.all_reduce(out)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, dim] -> logits [S, num_embeddings]; also serves as the head when embeddings are tied."""
        if self.quant is not None:
            logits = self.quant(hidden)
        elif self.packed is not None:
            logits = self.packed(hidden)
        else:
            logits = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            import torch.distributed as dist

            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.num_embeddings] if logits.shape[-1] != self.num_embeddings else logits

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp_rank}/{self.tp_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """An untied LM head: same sharding as the embedding, used only through compute_logits."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden)
