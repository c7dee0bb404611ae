"""Test helpers around radixlm's CPU kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from radixlm.layers import cpu_kernels


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
