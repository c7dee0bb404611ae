"""What the interpreter needs from an engine: four calls, in the Engine's own dict shapes.

One interpreter (executor.py, select.py) runs every program; a backend only moves requests. `EngineBackend`
calls an in-process `radixlm.Engine`; `RuntimeEndpoint` posts the same fields to a server's `/generate`
(radixlm's or SGLang's), which answers with the same dicts. So a program gives the same result on both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from radixlm.lang.chat import RoleTemplate

Prompts = list[str] | list[list[int]]


class BackendError(RuntimeError):
    """The engine refused or failed a call; the message is the engine's (over HTTP: the error body)."""


class Backend(ABC):
    @abstractmethod
    def generate(
        self,
        prompts: Prompts,
        params: list[dict[str, Any]],
        *,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
    ) -> list[dict[str, Any]]:
        """One batched call: texts or token ids, one sampling dict per prompt. Returns the Engine's dicts
        ({"text", "output_ids", "meta_info"}), one per prompt and sample, prompt-major."""

    @abstractmethod
    def stream(self, prompt: str, params: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        """One streamed generation: (text delta, meta_info so far) as the engine sends them."""

    @abstractmethod
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, as the engine encodes a text prompt."""

    @abstractmethod
    def role_template(self) -> RoleTemplate | None:
        """The chat template role blocks render through; None when the model has none."""

    @abstractmethod
    def get_server_info(self) -> dict[str, Any]:
        """The engine's counters (num_tokens_computed, total_cached_tokens, ...)."""

    @abstractmethod
    def flush_cache(self) -> bool:
        """Empty the prefix cache; False when the engine refuses (requests are running)."""

    def cache_prefix(self, text: str) -> None:
        """Compute `text` and leave it in the prefix cache (a zero-token generation)."""
        self.generate([text], [{"max_new_tokens": 0}])

    def shutdown(self) -> None:  # noqa: B027 - optional: most backends own nothing
        """Release what the backend started (nothing, unless it owns its engine)."""
