"""A checkpoint tensor that is read only when, and only as far as, it is used.

Tensor-parallel ranks keep a slice of most tensors. A LazyTensor answers `.shape`, `.dtype` and
`.is_floating_point()` from the safetensors header, and `.narrow()` / `.to(dtype)` by composing the request,
so a weight loader that narrows to its rank's rows or columns reads only those bytes from the file. Any
other use (a torch function, a Tensor method) reads what has been narrowed so far and hands the real tensor
on, so code that knows nothing of this still gets the right values.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class ReadCounter:
    """Bytes this process read from checkpoint files through LazyTensors (what a rank's load costs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n


READ = ReadCounter()


class LazyTensor:
    def __init__(self, handle: Any, name: str, box: tuple[tuple[int, int], ...] | None = None, cast=None) -> None:
        """handle: an open safetensors file (safe_open); box: (start, length) per dim, default the whole."""
        self._handle, self._name = handle, name
        self._slice = handle.get_slice(name)
        full = tuple(self._slice.get_shape())
        self._box = box if box is not None else tuple((0, n) for n in full)
        self._stored = _DTYPES[self._slice.get_dtype()]
        self._cast = cast

    @property
    def shape(self) -> torch.Size:
        return torch.Size(n for _, n in self._box)

    @property
    def dtype(self) -> torch.dtype:
        return self._cast or self._stored

    def dim(self) -> int:
        return len(self._box)

    @property
    def ndim(self) -> int:
        return len(self._box)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        dim = dim % len(self._box)
        begin, n = self._box[dim]
        if start < 0 or length < 0 or start + length > n:
            raise IndexError(f"{self._name}: narrow({dim}, {start}, {length}) is outside a size of {n}")
        box = list(self._box)
        box[dim] = (begin + start, length)
        return LazyTensor(self._handle, self._name, tuple(box), self._cast)

    def to(self, *args, **kwargs):
        dtype = kwargs.get("dtype", args[0] if args and isinstance(args[0], torch.dtype) else None)
        other = [a for a in args if not isinstance(a, torch.dtype)]
        if dtype is not None and not other and set(kwargs) <= {"dtype"}:
            return LazyTensor(self._handle, self._name, self._box, dtype)
        return self.materialize().to(*args, **kwargs)

    def materialize(self) -> torch.Tensor:
        """Read the box from the file (only it), in the requested dtype."""
        index = tuple(slice(b, b + n) for b, n in self._box)
        t = self._slice[index] if index else self._handle.get_tensor(self._name)
        READ.add(t.numel() * t.element_size())
        return t.to(self._cast) if self._cast is not None else t

    def contiguous(self) -> torch.Tensor:
        return self.materialize()

    def __getattr__(self, attr: str):
        # Any other Tensor method: on the real (narrowed) values.
        return getattr(self.materialize(), attr)

    def __repr__(self) -> str:
        return f"LazyTensor({self._name!r}, box={self._box}, dtype={self.dtype})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def real(x):
            if isinstance(x, LazyTensor):
                return x.materialize()
            if isinstance(x, (list, tuple)):
                return type(x)(real(y) for y in x)
            return x

        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})


def materialize(t: torch.Tensor | LazyTensor) -> torch.Tensor:
    return t.materialize() if isinstance(t, LazyTensor) else t
