"""Test helpers around radixlm's CPU kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from radixlm.layers import cpu_kernels


def _kernels_have(isa: str) -> bool:
    return (
        not cpu_kernels.disabled_by_env()
        and cpu_kernels.ops() is not None
        and isa in cpu_kernels.available_isas()
    )


def needs_flash_kernels(op: str) -> pytest.MarkDecorator:
    """Skip unless cpu_flash_attention.cpp's `op` can run here at all (its float32 form needs AVX-512)."""
    return pytest.mark.skipif(
        not _kernels_have("avx512"), reason=f"{op} needs radixlm's CPU kernels on a CPU with AVX-512"
    )


def flash_dtypes(op: str) -> list[Any]:
    """The pool dtypes `op` takes, as pytest params: bf16 (skipped without AVX512_BF16) and float32."""
    bf16 = pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            not _kernels_have("avx512_bf16"), reason=f"bf16 {op} needs a CPU with AVX512_BF16"
        ),
        id="bf16",
    )
    return [bf16, pytest.param(torch.float32, id="fp32")]


# Allowed error beyond twice torch's own SDPA's on the same inputs: an ulp of the output.
FLASH_SLACK = {torch.bfloat16: 2**-8, torch.float32: 2**-20}


class CountingOps:
    """cpu_kernels.ops() with every call of one op recorded: `calls` holds what `record` returns for each
    call's arguments. Tests install it with monkeypatch.setattr(cpu_kernels, "ops", lambda: counting)."""

    def __init__(self, name: str, record: Callable[..., Any]) -> None:
        self._real = cpu_kernels.ops()
        self._name = name
        self._record = record
        self.calls: list[Any] = []

    def __getattr__(self, attr: str) -> Any:
        op = getattr(self._real, attr)
        if attr != self._name:
            return op

        def counted(*args: Any) -> Any:
            self.calls.append(self._record(*args))
            return op(*args)

        return counted
