"""RadixAttention as one opaque custom op, so that a whole decoder compiles into one graph around it.

`torch.compile` cannot trace the attention backend: it walks per-step Python metadata (spans, masks, shared
groups) and writes the KV pool in place. Inside a compiled graph each attention layer therefore calls

    torch.ops.radixlm.radix_attention(q, k, v, key)  ->  [T, H * v_head_dim]

whose real implementation runs the layer's eager forward on the step's ForwardBatch, and whose fake
implementation only states the output shape. `key` is an int baked into the graph: it names one layer of one
compiled model (a registry entry, not per-step state), and the step's ForwardBatch is read from that model's
owner (model/compiled_forward.py), which holds it only for the duration of its own call. Two engines in one
process compile and run independently: their layers have different keys and different owners.

The op writes the KV pool, which is not a graph input, so the graph sees no mutation to order; its output
is always used (it feeds o_proj), so the compiler can neither drop nor reorder it across its consumers.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from radixlm.layers.attention import RadixAttention
    from radixlm.model.forward_batch import ForwardBatch


class StepOwner(Protocol):
    """Who holds the ForwardBatch of the step being run (the compiled forward of one model)."""

    def current_batch(self) -> ForwardBatch: ...


# key -> (layer, its owner). Weak, so a model that is dropped takes its entries with it.
_LAYERS: weakref.WeakValueDictionary[int, RadixAttention] = weakref.WeakValueDictionary()
_OWNERS: weakref.WeakValueDictionary[int, StepOwner] = weakref.WeakValueDictionary()
_keys = itertools.count(1)


def register(layer: RadixAttention, owner: StepOwner) -> int:
    """A key for `layer` run by `owner`; the layer calls the op with it while being compiled."""
    key = next(_keys)
    _LAYERS[key] = layer
    _OWNERS[key] = owner
    return key


@torch.library.custom_op("radixlm::radix_attention", mutates_args=())
def radix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int) -> torch.Tensor:
    layer = _LAYERS[key]
    return layer.eager_forward(q, k, v, _OWNERS[key].current_batch())


@radix_attention.register_fake
def _radix_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int) -> torch.Tensor:
    layer = _LAYERS[key]
    return q.new_empty(q.shape[0], layer.num_heads * layer.v_head_dim)
