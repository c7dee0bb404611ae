"""The server maps an abort to an HTTP status by the `status_code` the engine put in its finish reason
(messages.FinishReason.to_dict), never by its message text. Driven in process, over a stub Engine."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from radixlm.messages import ABORT_CLIENT, ABORT_CORE_DIED, ABORT_REFUSED, ABORT_SHUTDOWN, FinishReason
from radixlm.server.app import create_app


class StubTokenizerManager:
    max_chars_per_token = 64

    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> list[int]:
        return [5, 6]


class StubEngine:
    """Answers every request with one chunk that finishes with `reason` after `tokens` tokens."""

    model_info = {"model_path": "stub", "context_length": 64}
    tokenizer_manager = StubTokenizerManager()

    def __init__(self, reason: dict[str, Any], tokens: int = 0) -> None:
        self.reason = reason
        self.tokens = tokens

    def is_alive(self) -> bool:
        return True

    async def async_generate(self, *, stream: bool, rid: list[str], **_: Any):
        assert stream

        async def gen():
            for r in rid:
                yield {
                    "text": "x" * self.tokens,
                    "output_ids": [5] * self.tokens,
                    "meta_info": {
                        "id": r,
                        "prompt_tokens": 1,
                        "completion_tokens": self.tokens,
                        "cached_tokens": 0,
                        "finish_reason": self.reason,
                    },
                    "index": 0,
                }

        return gen()

    def abort_request(self, rid: str) -> None:
        pass


def _post_all(engine: StubEngine) -> list[httpx.Response]:
    app = create_app(engine, shutdown_engine=False)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return [
                await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}),
                await http.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                ),
                await http.post("/generate", json={"text": "hi"}),
            ]

    return asyncio.run(main())


# Messages that say the opposite of their kind: only status_code may decide.
CASES = [
    (FinishReason.abort(ABORT_REFUSED, "engine core died (just words)"), 0, 400),
    (FinishReason.abort(ABORT_CORE_DIED, "the prompt is too long (just words)"), 0, 503),
    (FinishReason.abort(ABORT_SHUTDOWN, "refused (just words)"), 0, 503),
    (FinishReason.abort(ABORT_CLIENT, "engine core died (just words)"), 0, 200),
    # A refusal after tokens were produced is a (partial) answer, not an error.
    (FinishReason.abort(ABORT_REFUSED, "retracted"), 2, 200),
]


@pytest.mark.parametrize(
    ("reason", "tokens", "status"), CASES, ids=["refused", "core-died", "shutdown", "client", "late-refusal"]
)
def test_abort_maps_by_status_code(reason: FinishReason, tokens: int, status: int) -> None:
    for r in _post_all(StubEngine(reason.to_dict(), tokens)):
        assert r.status_code == status, r.text
        if status != 200:
            error = r.json()["error"]
            assert error["message"] == reason.message
            assert error["type"] == ("invalid_request_error" if status == 400 else "service_unavailable")
