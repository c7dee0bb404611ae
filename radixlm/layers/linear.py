"""Linear layers that know their tensor-parallel shard, and load checkpoint tensors into it.

Every layer takes ``tp_rank`` / ``tp_size`` (default 0 / 1, where everything is a plain ``F.linear``) and
holds only its own shard. Each layer has a ``weight_loader(param, loaded_weight, shard_id=None)`` method
that copies the slice of a *full* checkpoint tensor that belongs to this rank:

    ReplicatedLinear           W [out, in]              every rank holds all of it
    ColumnParallelLinear       W [out / tp, in]         rank r holds rows r*out/tp ..   (output is sharded)
    MergedColumnParallelLinear W [sum(out_i) / tp, in]  shard i (gate=0, up=1) lands at its own row offset
    QKVParallelLinear          W [(Hq + 2*Hkv) * D, in] per rank; shards "q", "k", "v"
    RowParallelLinear          W [out, in / tp]         input is sharded; the outputs are summed (all-reduce)

The loader is a *module* method, not an attribute set on the Parameter (as in nano-vllm), because the
engine builds models on the meta device and ``Module.to_empty`` replaces every Parameter object, which
would drop such an attribute. The model's ``load_weights`` finds the owning module and calls its loader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from radixlm.layers.packed_linear import PackedWeight


class QuantizedMatmul(Protocol):
    """What a quantization method hands a layer (model/quantization/base.py's QuantizedWeight)."""

    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...


class QuantizedLinear(nn.Module):
    """Takes the place of a Transformers model's nn.Linear once its weight is quantized (DESIGN.md, the
    Transformers backend, 8): the packed weight and the float bias, nothing else."""

    def __init__(self, quant: QuantizedMatmul, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.quant = quant
        self.in_features, self.out_features = quant.in_features, quant.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {type(self.quant).__name__}"


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...] | torch.Size) -> None:
    """Raise ValueError (the caller adds the tensor's name) when a checkpoint tensor has the wrong shape."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not match expected {tuple(expected)}")


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
    """Copy a whole tensor (norm weights, replicated parameters)."""
    if shard_id is not None:
        raise ValueError(f"parameter is not packed, but got shard {shard_id!r}")
    check_shape(loaded_weight, param.shape)
    param.data.copy_(loaded_weight)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def _tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(x)
    return x


class LinearBase(nn.Module):
    """Holds a [out_per_rank, in_per_rank] weight (and optional [out_per_rank] bias)."""

    def __init__(
        self,
        in_per_rank: int,
        out_per_rank: int,
        *,
        bias: bool,
        tp_rank: int,
        tp_size: int,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is out of range for tp_size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_per_rank, self.out_per_rank = in_per_rank, out_per_rank
        self.weight = nn.Parameter(
            torch.empty(out_per_rank, in_per_rank, dtype=params_dtype), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_per_rank, dtype=params_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # Set by layers.packed_linear.prepack_linears when a prepacked CPU kernel is faster for this shape
        # (the dense weight is then dropped unless another module reads it) or the bf16 decode kernel
        # runs it; None: plain F.linear.
        self.packed: PackedWeight | None = None
        # Set by model.quantization after load: the packed integer weight, called like F.linear (the float
        # weight is then dropped). Duck-typed here: layers import nothing of model/.
        self.quant: QuantizedMatmul | None = None

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is not None:
            return self.quant(x, bias)
        if self.packed is not None:
            return self.packed(x, bias)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def _load_rows(
        self, param: torch.Tensor, loaded: torch.Tensor, dst_start: int, src_start: int, n: int
    ) -> None:
        """Copy rows [src_start, src_start+n) of a checkpoint tensor into rows [dst_start, ...) of param."""
        param.data.narrow(0, dst_start, n).copy_(loaded.narrow(0, src_start, n))

    def extra_repr(self) -> str:
        packed = f", {self.packed.kernels()}" if self.packed is not None else ""
        packed += f", quantized {type(self.quant).__name__}" if self.quant is not None else ""
        return (
            f"in={self.in_per_rank}, out={self.out_per_rank}, bias={self.bias is not None}, "
            f"tp={self.tp_rank}/{self.tp_size}{packed}"
        )


class ReplicatedLinear(LinearBase):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            input_size, output_size, bias=bias, tp_rank=tp_rank, tp_size=tp_size, params_dtype=params_dtype
        )

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        default_weight_loader(param, loaded_weight, shard_id)


class ColumnParallelLinear(LinearBase):
    """Output features are split across ranks; each rank returns its slice (no communication)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        out = divide(output_size, tp_size, "output size")
        super().__init__(
            input_size, out, bias=bias, tp_rank=tp_rank, tp_size=tp_size, params_dtype=params_dtype
        )

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"parameter is not packed, but got shard {shard_id!r}")
        check_shape(loaded_weight, (self.out_per_rank * self.tp_size, *param.shape[1:]))
        self._load_rows(param, loaded_weight, 0, self.tp_rank * self.out_per_rank, self.out_per_rank)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_proj + up_proj); shard_id is the index."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        *,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        self.output_sizes = list(output_sizes)
        for size in self.output_sizes:
            divide(size, tp_size, "merged output size")
        super().__init__(
            input_size,
            sum(output_sizes),
            bias=bias,
            tp_rank=tp_rank,
            tp_size=tp_size,
            params_dtype=params_dtype,
        )

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(
                f"merged linear needs a shard index in [0, {len(self.output_sizes)}), got {shard_id!r}"
            )
        check_shape(loaded_weight, (self.output_sizes[shard_id], *param.shape[1:]))
        n = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        self._load_rows(param, loaded_weight, offset, self.tp_rank * n, n)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; heads are split across ranks.

    Output layout per rank: [ q: Hq*D | k: Hkv*D | v: Hkv*D ]. When tp_size exceeds the number of KV heads,
    each KV head is replicated on tp_size / total_kv_heads ranks (as in vLLM).
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        *,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, "number of attention heads")
        if tp_size >= total_num_kv_heads:
            divide(tp_size, total_num_kv_heads, "tp_size over KV heads")  # replication must be even
            self.num_kv_heads, self.kv_replicas = 1, tp_size // total_num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = divide(total_num_kv_heads, tp_size, "number of KV heads"), 1
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        # ColumnParallelLinear divides by tp_size, so hand it the size summed over ranks.
        super().__init__(
            hidden_size,
            (self.q_size + 2 * self.kv_size) * tp_size,
            bias=bias,
            tp_rank=tp_rank,
            tp_size=tp_size,
            params_dtype=params_dtype,
        )

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id == "q":
            total, n, dst, src_rank = self.total_num_heads, self.q_size, 0, self.tp_rank
        elif shard_id in ("k", "v"):
            dst = self.q_size + (self.kv_size if shard_id == "v" else 0)
            total, n, src_rank = self.total_num_kv_heads, self.kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"QKV linear needs shard 'q', 'k' or 'v', got {shard_id!r}")
        check_shape(loaded_weight, (total * self.head_dim, *param.shape[1:]))
        self._load_rows(param, loaded_weight, dst, src_rank * n, n)


class RowParallelLinear(LinearBase):
    """Input features are split across ranks; partial outputs are summed with an all-reduce.

    The bias is added on rank 0 only, so that the sum counts it once.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        inp = divide(input_size, tp_size, "input size")
        super().__init__(
            inp, output_size, bias=bias, tp_rank=tp_rank, tp_size=tp_size, params_dtype=params_dtype
        )

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"parameter is not packed, but got shard {shard_id!r}")
        if param.dim() == 1:  # bias: not sharded
            default_weight_loader(param, loaded_weight)
            return
        check_shape(loaded_weight, (param.shape[0], self.in_per_rank * self.tp_size))
        param.data.copy_(loaded_weight.narrow(1, self.tp_rank * self.in_per_rank, self.in_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, self.bias if self.tp_rank == 0 else None)
        return _tp_all_reduce(y) if self.tp_size > 1 else y
