"""Issue 10, hole 7 (the routes' half): an abort the engine decided (the KV cache ran out mid-answer, say)
comes back on the OpenAI routes as finish_reason "abort" with its reason in `abort_message`, streamed or
not; before, the reason reached only /generate. Over a stub Engine, in process."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from radixlm.messages import ABORT_REFUSED, FinishReason
from radixlm.server.app import create_app

REASON = FinishReason.abort(ABORT_REFUSED, "the KV cache is too small for this request").to_dict()


class StubTokenizerManager:
    max_chars_per_token = 64

    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> list[int]:
        return [5, 6]


class AbortingEngine:
    """Two tokens, then `reason` (by default the engine's own abort)."""

    model_info = {"model_path": "stub", "context_length": 64}
    tokenizer_manager = StubTokenizerManager()

    def __init__(self, reason: dict[str, Any] = REASON) -> None:
        self.reason = reason

    def is_alive(self) -> bool:
        return True

    async def async_generate(self, *, rid: list[str], **_: Any):
        async def gen():
            for r in rid:
                yield {
                    "text": "ab",
                    "output_ids": [5, 6],
                    "meta_info": {
                        "id": r,
                        "prompt_tokens": 1,
                        "completion_tokens": 2,
                        "finish_reason": self.reason,
                    },
                    "index": 0,
                }

        return gen()

    def abort_request(self, rid: str) -> None:
        pass


def _post(path: str, body: dict, engine: AbortingEngine | None = None) -> httpx.Response:
    app = create_app(engine or AbortingEngine(), shutdown_engine=False)

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post(path, json=body)

    return asyncio.run(main())


def _stream_choices(r: httpx.Response) -> list[dict]:
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [c for e in events[:-1] for c in json.loads(e)["choices"]]


def test_an_engine_abort_carries_its_reason_on_the_openai_routes() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    completion = {"prompt": "hi", "max_tokens": 8}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        r = _post(path, body)
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        assert choice["finish_reason"] == "abort"
        assert choice["abort_message"] == REASON["message"]

        streamed = _post(path, {**body, "stream": True})
        last = [c for c in _stream_choices(streamed) if c.get("finish_reason")][-1]
        assert last["finish_reason"] == "abort" and last["abort_message"] == REASON["message"]


def test_a_normal_finish_has_no_abort_message() -> None:
    engine = AbortingEngine({"type": "length", "length": 2})
    (choice,) = _post("/v1/completions", {"prompt": "hi", "max_tokens": 2}, engine).json()["choices"]
    assert choice["finish_reason"] == "length" and choice["abort_message"] is None
