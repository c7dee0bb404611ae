"""Pooling routes: /v1/embeddings through the official `openai` client against a real server process
(started by its CLI, as tests/server/test_server.py does), SGLang's /encode, and /v1/classify + /classify
(the app over a real in-process Engine, driven through httpx's ASGI transport: no second server start).
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
import transformers

from radixlm import Engine
from radixlm.server.app import create_app
from radixlm.testing import cached_model_folder
from radixlm.testing.embedding_models import embedding_folder
from tests.server.test_server import Server, _stop, launch

MODEL = "tiny-bert"
TOL = 1e-5


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = launch(["--model-path", str(embedding_folder("bert_embed")), "--dtype", "float32",
                  "--served-model-name", MODEL, "--max-total-tokens", "20000"])  # fmt: skip
    try:
        yield srv
    finally:
        _stop(srv)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference():
    path = embedding_folder("bert_embed")
    model = transformers.BertModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)

    @torch.no_grad()
    def embed(ids_or_text) -> torch.Tensor:
        ids = tok(ids_or_text)["input_ids"] if isinstance(ids_or_text, str) else ids_or_text
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        return torch.nn.functional.normalize(h[0], dim=-1)  # CLS, normalized: vLLM's encoder default

    @torch.no_grad()
    def embed_many(prompts: list[list[int]]) -> list[torch.Tensor]:
        """The same, one batched forward per prompt length (no padding, so exactly the per-prompt values)."""
        out: list[torch.Tensor | None] = [None] * len(prompts)
        for n in {len(p) for p in prompts}:
            idx = [i for i, p in enumerate(prompts) if len(p) == n]
            h = model(input_ids=torch.tensor([prompts[i] for i in idx])).last_hidden_state[:, 0]
            for i, vec in zip(idx, torch.nn.functional.normalize(h, dim=-1)):
                out[i] = vec
        return out

    embed.many = embed_many
    return embed


def _close(got, ref: torch.Tensor) -> bool:
    return (torch.tensor(got) - ref).abs().max().item() < TOL


def test_openai_client_every_input_form(client: openai.OpenAI, reference) -> None:
    texts = ["hello world", "the quick brown fox"]
    # The client asks for base64 unless told otherwise and decodes it: both encodings are exercised.
    for kwargs in ({}, {"encoding_format": "float"}):
        r = client.embeddings.create(model=MODEL, input=texts, **kwargs)
        assert [d.index for d in r.data] == [0, 1]
        assert all(_close(d.embedding, reference(t)) for d, t in zip(r.data, texts))
    single = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert len(single.data) == 1 and _close(single.data[0].embedding, reference("hello world"))
    assert single.usage.prompt_tokens == single.usage.total_tokens > 0
    ids = client.embeddings.create(model=MODEL, input=[5, 6, 7], encoding_format="float")
    assert _close(ids.data[0].embedding, reference([5, 6, 7]))
    lists = client.embeddings.create(model=MODEL, input=[[5, 6, 7], [9]], encoding_format="float")
    assert _close(lists.data[1].embedding, reference([9]))
    assert lists.usage.prompt_tokens == 4


def test_base64_is_little_endian_float32(server: Server, reference) -> None:
    r = httpx.post(
        f"{server.url}/v1/embeddings", json={"input": [5, 6, 7], "encoding_format": "base64"}, timeout=60
    )
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert _close(list(struct.unpack(f"<{len(raw) // 4}f", raw)), reference([5, 6, 7]))


def test_256_inputs_in_one_request_keep_order(client: openai.OpenAI, reference) -> None:
    inputs = [[(i * 11 + j) % 2000 + 1 for j in range(1 + i % 9)] for i in range(256)]
    r = client.embeddings.create(model=MODEL, input=inputs, encoding_format="float")
    assert [d.index for d in r.data] == list(range(256))
    assert all(_close(d.embedding, ref) for d, ref in zip(r.data, reference.many(inputs)))
    assert r.usage.prompt_tokens == sum(len(x) for x in inputs)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [[1, 2], []]}, "input"),
        ({"input": {"text": "x"}}, "input"),
        ({"input": [1, 10**9]}, "input"),  # outside the vocabulary: the Engine's check, as a 400
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "hi", "dimensions": 8}, "dimensions"),
        ({"input": "hi", "temperature": 0.5}, "temperature"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server: Server, body: dict, param: str) -> None:
    r = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and param in (err["param"] or "") and err["message"]


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=MODEL, input="hi", dimensions=3)


def test_native_encode_and_generate_refused(server: Server, reference) -> None:
    assert httpx.get(f"{server.url}/health_generate", timeout=60).status_code == 200  # pools one token
    one = httpx.post(f"{server.url}/encode", json={"text": "hello world"}, timeout=60).json()
    assert set(one) == {"embedding", "meta_info"} and _close(one["embedding"], reference("hello world"))
    many = httpx.post(f"{server.url}/encode", json={"input_ids": [[5, 6], [7]]}, timeout=60).json()
    assert len(many) == 2 and _close(many[1]["embedding"], reference([7]))
    both = httpx.post(f"{server.url}/encode", json={"text": "a", "input_ids": [1]}, timeout=60)
    assert both.status_code == 400
    for route, body in (
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("/generate", {"text": "hi"}),
    ):
        r = httpx.post(f"{server.url}{route}", json=body, timeout=60)
        assert r.status_code == 400 and "pooling model" in r.json()["error"]["message"], (route, r.text)


def _asgi(engine: Engine, calls: list[tuple[str, dict]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        app = create_app(engine, shutdown_engine=False, served_model_name="m")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [await c.post(path, json=body, timeout=60) for path, body in calls]

    return asyncio.run(run())


def test_classify_routes() -> None:
    path = embedding_folder("qwen2_classify")
    model = transformers.Qwen2ForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[5, 6, 7, 8], [40, 41]]
    with Engine(model_path=str(path), dtype="float32", inline_core=True, log_level="warning") as llm:
        v1, vllm, embed = _asgi(llm, [("/v1/classify", {"input": prompts}), ("/classify", {"model": "m", "input": prompts}),
                                      ("/v1/embeddings", {"input": "hi"})])  # fmt: skip
    for r in (v1, vllm):
        body = r.json()
        assert r.status_code == 200 and body["object"] == "list" and body["id"].startswith("classify-")
        assert body["usage"] == {
            "prompt_tokens": 6,
            "total_tokens": 6,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        }
        for d, ids in zip(body["data"], prompts):
            with torch.no_grad():
                probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            assert d["num_classes"] == 3 and _close(d["probs"], probs)
            assert d["label"] == model.config.id2label[int(probs.argmax())]
    assert embed.status_code == 400 and "/v1/classify" in embed.json()["error"]["message"]


def test_pooling_routes_refuse_a_generator() -> None:
    with Engine(model_path=str(cached_model_folder("qwen2")), inline_core=True, log_level="warning") as llm:
        emb, cls = _asgi(llm, [("/v1/embeddings", {"input": "hi"}), ("/v1/classify", {"input": "hi"})])
    assert emb.status_code == 400 and "generative model" in emb.json()["error"]["message"]
    assert cls.status_code == 400 and "not a classification model" in cls.json()["error"]["message"]
