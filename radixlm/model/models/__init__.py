"""Native model implementations, by the HF `architectures` name they serve."""

from __future__ import annotations

from torch import nn

from radixlm.model.models import llama

NATIVE_ARCHITECTURES: dict[str, type[nn.Module]] = {**llama.ARCHITECTURES}

__all__ = ["NATIVE_ARCHITECTURES"]
