"""The default backend: what `run` uses when it is given none (SGLang's `set_default_backend`).

This is the one piece of process-wide state in the language, and it is the user's own: set explicitly,
read only by `run` / `run_batch` when they get no `backend=`. Two programs may still use two backends by
passing `backend=` each.
"""

from __future__ import annotations

import threading
from typing import Any

from radixlm.lang.backend import Backend

_lock = threading.Lock()
_default: list[Backend] = []  # zero or one backend


def as_backend(obj: Any) -> Backend:
    """A Backend as is; a radixlm Engine wrapped in an EngineBackend."""
    if isinstance(obj, Backend):
        return obj
    if hasattr(obj, "tokenizer_manager") and hasattr(obj, "generate"):  # an Engine (no import: it is heavy)
        from radixlm.lang.engine_backend import EngineBackend

        return EngineBackend(obj)
    raise TypeError(
        f"not a backend: {type(obj).__name__} (use a radixlm Engine, EngineBackend or RuntimeEndpoint)"
    )


def set_default_backend(backend: Any) -> None:
    be = as_backend(backend)
    with _lock:
        _default[:] = [be]


def get_default_backend() -> Backend | None:
    with _lock:
        return _default[0] if _default else None


def resolve_backend(backend: Any = None) -> Backend:
    if backend is not None:
        return as_backend(backend)
    be = get_default_backend()
    if be is None:
        raise ValueError("no backend: pass backend= or call set_default_backend(...) first")
    return be
