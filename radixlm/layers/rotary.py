"""Rotary position embedding, indexed by each token's own position (a packed batch mixes sequences).

inv_freq and the attention scaling come from transformers' own ``ROPE_INIT_FUNCTIONS`` (linear, llama3,
yarn, ...), so every static rope type matches HF exactly. The cos/sin table is built once, in float32, up to
max_position_embeddings, and grown when a longer position shows up:

    cos_table, sin_table  [P, rotary_dim / 2]    = cos/sin(p * inv_freq) * attention_scaling

Layout is HF's "neox" (rotate_half) form, applied to the first rotary_dim dims of each head; the rest pass
through (partial rotary):

    head:  [ x1 (rot/2) | x2 (rot/2) | pass (head_dim - rot) ]
    out:   [ x1*cos - x2*sin | x2*cos + x1*sin | pass ]

which is bit-for-bit HF's `q * cat(cos, cos) + rotate_half(q) * cat(sin, sin)`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from radixlm.layers import cpu_kernels

# These rescale *all* positions by the current sequence length in HF; a KV cache that keeps earlier keys
# cannot reproduce that, so the native path refuses them rather than silently differ.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        inv_freq: torch.Tensor,
        attention_scaling: float = 1.0,
        max_position: int = 4096,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = 2 * inv_freq.numel()
        if self.rotary_dim > head_dim:
            raise ValueError(f"rotary dim {self.rotary_dim} exceeds head_dim {head_dim}")
        # Plain attributes, not buffers: the model is built on the meta device and `to_empty` would turn a
        # buffer into uninitialized memory. The table is (re)built lazily on the device that uses it.
        self.inv_freq = inv_freq.detach().to("cpu", torch.float32)
        self.attention_scaling = float(attention_scaling)
        self.max_position = int(max_position)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _build(self, size: int, device: torch.device) -> None:
        # The same float32 ops, in the same order, as HF's rotary forward: p.float() * inv_freq, cos, * scale.
        pos = torch.arange(size, dtype=torch.int64, device=device).float()
        freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
        self._cos = freqs.cos() * self.attention_scaling
        self._sin = freqs.sin() * self.attention_scaling

    def cos_sin(
        self, positions: torch.Tensor, max_position: int | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> (cos, sin), each [T, rotary_dim / 2], in `dtype` (default float32).

        `max_position` is an upper bound on `positions` that the caller knows without a device sync (the
        runner knows its sequence lengths); without it, positions.max() is read.
        """
        needed = (int(positions.max()) if positions.numel() else 0) if max_position is None else max_position
        size = max(self.max_position, needed + 1)
        if self._cos is None or self._cos.device != positions.device or self._cos.shape[0] < size:
            if size > self.max_position:  # grow geometrically so a slowly growing decode rebuilds rarely
                size = max(size, 2 * self.max_position)
                self.max_position = size
            self._build(size, positions.device)
        cos, sin = self._cos[positions], self._sin[positions]
        if dtype is not None:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq*D] (or [T, Hq, D]), k likewise -> rotated q, k in the same shapes."""
        cos, sin = self.cos_sin(positions, dtype=q.dtype)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # (Not named `apply`: that would shadow nn.Module.apply.)
        return apply_rotary(x, cos, sin, self.head_dim, self.rotary_dim)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, scaling={self.attention_scaling}"


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, rotary_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary on a layer's q and k, [T, H*D] each; on a CPU where the kernels built, one C++ call
    (cpu_elementwise.cpp) that rounds every intermediate as the torch form does: bitwise the same, in ~13 us
    against ~80 us for the 12 torch ops at decode sizes. The torch form while torch.compile traces (it fuses
    the form itself) and for other layouts."""
    if (
        q.device.type == "cpu"
        and q.dim() == 2
        and k.dim() == 2
        and q.stride(1) == 1
        and k.stride(1) == 1
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and not torch.compiler.is_compiling()
        and cpu_kernels.elementwise_ok()
    ):
        return cpu_kernels.ops().rotary_qk(q, k, cos, sin, head_dim, rotary_dim)
    return apply_rotary(q, cos, sin, head_dim, rotary_dim), apply_rotary(k, cos, sin, head_dim, rotary_dim)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, rotary_dim: int
) -> torch.Tensor:
    """x [T, H*D] or [T, H, D]; cos/sin [T, rotary_dim/2] in x's dtype. Returns a new tensor shaped like x."""
    shape = x.shape
    x = x.view(shape[0], -1, head_dim)
    half = rotary_dim // 2
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    parts = [x1 * c - x2 * s, x2 * c + x1 * s]
    if rotary_dim < head_dim:
        parts.append(x[..., rotary_dim:])
    return torch.cat(parts, dim=-1).view(shape)


def get_rope(config: PretrainedConfig, head_dim: int) -> RotaryEmbedding:
    """The RotaryEmbedding a Llama-family config asks for (its `rope_parameters`, transformers 5.x)."""
    # transformers' init functions standardize the config in place; work on a copy so ours stays untouched.
    cfg = copy.deepcopy(config)
    params = getattr(cfg, "rope_parameters", None) or {}
    layer_types = getattr(cfg, "layer_types", None) or ()
    if any(key in layer_types for key in params):
        raise NotImplementedError(
            "per-layer-type rope_parameters are not supported by the native rotary layer"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        raise NotImplementedError(
            f"rope_type={rope_type!r} rescales every position by the current sequence length, which a KV cache "
            "cannot reproduce exactly; use model_impl='transformers' for this model"
        )
    # The HF meta-device build may be active around us; rope tables must be real numbers on the CPU.
    with torch.device("cpu"):
        if rope_type == "default":
            # ROPE_INIT_FUNCTIONS has no "default" entry (each HF model class carries its own): base^(-2i/dim).
            base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
            dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            scaling = 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
        else:
            raise ValueError(
                f"unknown rope_type {rope_type!r}; transformers knows {sorted(ROPE_INIT_FUNCTIONS)}"
            )
    return RotaryEmbedding(head_dim, inv_freq, scaling, getattr(config, "max_position_embeddings", 4096))
