"""EngineBackend: programs run against an in-process `radixlm.Engine` (no server, no HTTP).

llm = radixlm.Engine(model_path=...)
sgl.set_default_backend(llm)                 # wrapped in an EngineBackend
sgl.set_default_backend(EngineBackend(model_path=...))   # or let the backend own its Engine
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from radixlm.lang.backend import Backend, BackendError, Prompts
from radixlm.lang.chat import RoleTemplate, template_from_tokenizer

if TYPE_CHECKING:
    from radixlm.frontend.engine import Engine


class EngineBackend(Backend):
    def __init__(self, engine: Engine | None = None, **engine_options: Any) -> None:
        """Use `engine`, or start one from `engine_options` (Engine's arguments) and own it."""
        if engine is None:
            from radixlm.frontend.engine import Engine

            engine = Engine(**engine_options)
            self._owns = True
        elif engine_options:
            raise ValueError("pass either an Engine or the options to start one, not both")
        else:
            self._owns = False
        self.engine = engine
        tm = engine.tokenizer_manager
        self._template = template_from_tokenizer(tm.tokenizer, tm.chat_template)

    def generate(
        self,
        prompts: Prompts,
        params: list[dict[str, Any]],
        *,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
    ) -> list[dict[str, Any]]:
        key = "input_ids" if prompts and not isinstance(prompts[0], str) else "prompt"
        try:
            return self.engine.generate(
                **{key: list(prompts)},
                sampling_params=list(params),
                return_logprob=return_logprob,
                logprob_start_len=logprob_start_len,
                top_logprobs_num=top_logprobs_num,
            )
        except (ValueError, TypeError) as e:  # what the Engine raises for a request it refuses
            raise BackendError(str(e)) from e

    def stream(self, prompt: str, params: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            chunks = self.engine.generate(prompt=prompt, sampling_params=params, stream=True)
            for chunk in chunks:  # each chunk's text is the delta since the previous one
                yield chunk["text"], chunk["meta_info"]
        except (ValueError, TypeError) as e:
            raise BackendError(str(e)) from e

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        encode = self.engine.tokenizer_manager.encode
        return [encode(t) for t in texts]

    def role_template(self) -> RoleTemplate | None:
        return self._template

    def get_server_info(self) -> dict[str, Any]:
        return self.engine.get_server_info()

    def flush_cache(self) -> bool:
        return bool(self.engine.flush_cache()["success"])

    def shutdown(self) -> None:
        if self._owns:
            self.engine.shutdown()
