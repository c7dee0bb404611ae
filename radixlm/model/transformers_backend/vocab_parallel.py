"""The vocabulary split of a Transformers model under tensor parallelism: its own embedding and LM head
modules, kept, with 1/N of the rows each.

The split is the native layers' (layers/embedding.py): tp_size contiguous ranges of ceil(vocab / tp_size)
rows, the last one zero-padded. The modules stay transformers' own, so whatever their forward adds (Gemma's
scaled embedding) still runs:

    embedding   looks up the ids of this rank's range (others read row 0 and are zeroed after the module,
                which is linear in its row), then an all-reduce sums the ranks
    LM head     computes this rank's range of logits; an all-gather concatenates them, padding cut off
"""

from __future__ import annotations

import torch
from torch import nn

from radixlm.model.loader import ModelLoadError


class VocabSplit:
    """One rank's range of a vocabulary of `vocab_size` rows."""

    def __init__(self, vocab_size: int, rank: int, size: int) -> None:
        self.vocab_size, self.rank, self.size = vocab_size, rank, size
        self.per_rank = -(-vocab_size // size)
        self.start = rank * self.per_rank
        # Rows of the real vocabulary this rank holds (the last rank may hold fewer, or none).
        self.num_real = max(0, min(self.per_rank, vocab_size - self.start))

    def resize(self, module: nn.Module, what: str) -> None:
        """Give a module still on the meta device this rank's number of rows (weight, and bias if any)."""
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if p is None:
                continue
            if p.shape[0] != self.vocab_size:
                raise ModelLoadError(
                    f"the {what} {attr} has {p.shape[0]} rows, not the vocabulary's {self.vocab_size}; "
                    "radixlm cannot split it across tensor-parallel ranks; use tp_size 1"
                )
            shape = (self.per_rank, *p.shape[1:])
            module._parameters[attr] = nn.Parameter(torch.empty(shape, dtype=p.dtype, device=p.device), False)
        for count in ("num_embeddings", "out_features"):
            if hasattr(module, count):
                setattr(module, count, self.per_rank)

    def slice(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full [vocab, ...] checkpoint tensor, zero-padded to per_rank rows."""
        if tensor.shape[0] != self.vocab_size:
            raise ModelLoadError(
                f"a vocabulary tensor has {tensor.shape[0]} rows, the config says {self.vocab_size}"
            )
        part = tensor.narrow(0, self.start, self.num_real)  # first: a lazy checkpoint tensor reads only this
        out = torch.zeros((self.per_rank, *tensor.shape[1:]), dtype=part.dtype)
        out[: self.num_real].copy_(part)
        return out

    def wrap_embedding(self, module: nn.Module) -> None:
        """Make the embedding module's call return the full-vocabulary lookup, summed over the ranks."""
        inner = module.forward

        def forward(input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            import torch.distributed as dist

            local = input_ids - self.start
            in_range = (local >= 0) & (local < self.num_real)
            out = inner(torch.where(in_range, local, 0), *args, **kwargs)
            out = out * in_range.unsqueeze(-1).to(out.dtype)
            dist.all_reduce(out)
            return out

        module.forward = forward

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[S, per_rank] local logits -> [S, vocab] on every rank."""
        import torch.distributed as dist

        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]
