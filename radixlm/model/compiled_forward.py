"""`--enable-torch-compile`: the decoder compiled by torch.compile (inductor), attention left to the backend.

What compiles is a native model's `model.decode(input_ids, cos, sin, None)`: embedding, every layer's norms,
linears, rotary and gated MLP, and the final norm, as one graph per shape class. Each attention layer is
one opaque op in that graph (layers/compiled_attention.py) whose real implementation runs the attention
backend on the step's ForwardBatch, which this object holds for the duration of its call. The rotary rows
are gathered outside (they read host lists and may grow the table).

Shapes: the packed token dimension is marked dynamic, so a handful of graphs serve every step (dynamo
specializes a dimension of size 1: a batch-1 decode step gets its own graph, every other step shares one).
Graphs compile lazily, on the first step of each shape class, and inductor's on-disk caches make a later
start on the same machine reuse them (`compile_seconds` in the start-up log and `get_server_info`).

Anything the compiler cannot handle (a quantized kernel it cannot trace, an unsupported op) is caught while
tracing, before any real op has run: the model then stays eager for good and the log says why. Errors from
running the real ops (bad input, out of memory) are not the compiler's and propagate unchanged.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from radixlm.layers import compiled_attention
from radixlm.layers.attention import RadixAttention

if TYPE_CHECKING:
    from radixlm.model.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


def compile_unsupported(model: nn.Module, tp_size: int) -> str | None:
    """Why `model` cannot be compiled here, or None when it can."""
    inner = getattr(model, "model", None)
    if not (callable(getattr(inner, "decode", None)) and callable(getattr(inner, "rope", None))):
        return f"{type(model).__name__} has no compilable decoder (only native implementations do)"
    if tp_size > 1:
        return "tensor parallelism (its all-reduces are not traced)"
    return None


class CompiledForward:
    """Called like the model: (input_ids, positions, forward_batch) -> hidden [T, hidden]."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._inner = model.model
        self._batch: ForwardBatch | None = None
        for layer in model.modules():
            if isinstance(layer, RadixAttention):
                layer.compile_key = compiled_attention.register(layer, self)
        # mark_dynamic below, not dynamic=True: only the token axis varies; weights keep static shapes.
        self._compiled = torch.compile(self._inner.decode, fullgraph=True, dynamic=False)
        self.failed: str | None = None
        self.compile_seconds = 0.0  # first-call time of each shape class, summed
        self._seen: set[bool] = set()

    def current_batch(self) -> ForwardBatch:
        if self._batch is None:
            raise RuntimeError("radix_attention ran outside a compiled step")
        return self._batch

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch) -> Any:
        if self.failed is not None:
            return self.model(input_ids, positions, forward_batch)
        cos, sin = self._inner.rope(positions, forward_batch)
        for t in (input_ids, cos, sin):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        shape_class = input_ids.shape[0] == 1
        first = shape_class not in self._seen
        start = time.perf_counter()
        self._batch = forward_batch
        try:
            hidden = self._compiled(input_ids, cos, sin, None)
        except torch._dynamo.exc.TorchDynamoException as e:
            # Raised while tracing or compiling, before the graph ran a real op: no KV was written.
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            logger.warning("torch.compile failed, running eager from now on: %s", self.failed)
            return self.model(input_ids, positions, forward_batch)
        finally:
            self._batch = None
        if first:
            self._seen.add(shape_class)
            seconds = time.perf_counter() - start
            self.compile_seconds += seconds
            logger.info(
                "torch.compile: graph for %s steps ready in %.1f s",
                "one-token" if shape_class else "multi-token",
                seconds,
            )
        return hidden
