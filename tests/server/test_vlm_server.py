"""Vision-language requests over HTTP: chat `image_url` parts through the official `openai` client and
SGLang's `image_data` on /generate (tiny LLaVA), checked against transformers' greedy output for the same
processor inputs; a text-only model refuses images with a 400 naming the field; http(s) image URLs are
refused unless --allow-image-urls.

The app runs over an in-process Engine through httpx's ASGI transport (the openai client takes that
transport too): a real server process costs 40-60 s to start on the shared CI machine. One slow test runs
the same chat against a real server process started by its CLI:
    pytest -m slow tests/server/test_vlm_server.py"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch

from radixlm import Engine
from radixlm.server.app import create_app
from radixlm.testing import cached_model_folder
from radixlm.testing.vlm_models import cached_vlm_folder, random_image
from tests.server.test_server import Server, _stop, launch

MODEL = "tiny-llava"
MAX_NEW = 6


@pytest.fixture(scope="module")
def real_server() -> Iterator[Server]:
    srv = launch(["--model-path", str(cached_vlm_folder("llava")), "--dtype", "float32",
                  "--served-model-name", MODEL, "--max-total-tokens", "4096"])  # fmt: skip
    try:
        yield srv
    finally:
        _stop(srv)


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = cached_vlm_folder("llava")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()

    def greedy(text: str, images: list) -> list[int]:
        inputs = processor(text=text, images=images, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return ids[: ids.index(eos)] if eos in ids else ids  # the answer as the server returns it

    return processor, greedy


@pytest.fixture(scope="module")
def engine():
    with Engine(
        model_path=str(cached_vlm_folder("llava")),
        dtype="float32",
        max_total_tokens=4096,
        inline_core=True,
        log_level="warning",
    ) as llm:
        yield llm


def _run(engine: Engine, calls):
    """calls(openai_client, http_client) -> results, against the app over httpx's ASGI transport."""

    async def run():
        app = create_app(engine, shutdown_engine=False, served_model_name=MODEL)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            client = openai.AsyncOpenAI(
                base_url="http://t/v1", api_key="unused", http_client=http, max_retries=0
            )
            return await calls(client, http)

    return asyncio.run(run())


def _chat_messages(image) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url(image)}},
                {"type": "text", "text": "what is in this picture"},
            ],
        }
    ]


def test_chat_image_url_through_the_openai_client(engine: Engine, hf) -> None:
    processor, greedy = hf
    image = random_image(21)
    messages = _chat_messages(image)

    async def calls(client, http):
        first = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=MAX_NEW, temperature=0
        )
        again = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=MAX_NEW, temperature=0
        )
        return first, again

    engine.flush_cache()
    first, again = _run(engine, calls)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert first.choices[0].message.content == processor.tokenizer.decode(greedy(text, [image]))
    assert first.usage.prompt_tokens == len(processor(text=text, images=[image])["input_ids"][0])
    assert again.choices[0].message.content == first.choices[0].message.content


def test_generate_image_data(engine: Engine, hf) -> None:
    processor, greedy = hf
    image = random_image(22)
    text = "look <image> and describe it"
    params = {"max_new_tokens": MAX_NEW, "temperature": 0}
    body = {"text": text, "image_data": _data_url(image), "sampling_params": params}
    other_body = {**body, "image_data": _data_url(random_image(23))}

    async def calls(client, http):
        return [await http.post("/generate", json=b, timeout=60) for b in (body, body, other_body)]

    engine.flush_cache()
    first, second, other = _run(engine, calls)
    assert first.status_code == 200, first.text
    assert first.json()["output_ids"] == greedy(text, [image])
    ids = processor(text=text, images=[image])["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    positions = [i for i, t in enumerate(ids) if t == image_id]
    assert second.json()["meta_info"]["cached_tokens"] >= positions[-1] + 1  # the hit covers the image
    assert other.json()["meta_info"]["cached_tokens"] <= positions[0]  # a different image: not past its start


def test_image_urls_refused_without_the_flag(engine: Engine) -> None:
    body = {
        "text": "x <image>",
        "image_data": "https://example.com/a.png",
        "sampling_params": {"max_new_tokens": 1},
    }

    async def calls(client, http):
        return await http.post("/generate", json=body)

    r = _run(engine, calls)
    assert r.status_code == 400 and "allow-image-urls" in r.text
    assert r.json()["error"]["param"] == "image_data"


def test_text_model_refuses_images_with_400() -> None:
    url = _data_url(random_image(1))
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": 1,
    }
    generate = {"text": "hi", "image_data": url, "sampling_params": {"max_new_tokens": 1}}

    async def run(engine) -> list[httpx.Response]:
        app = create_app(engine, shutdown_engine=False, served_model_name="m")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [await c.post("/generate", json=generate), await c.post("/v1/chat/completions", json=chat)]

    with Engine(
        model_path=str(cached_model_folder("qwen2")), dtype="float32", inline_core=True, log_level="warning"
    ) as engine:
        gen, chat_r = asyncio.run(run(engine))
    assert gen.status_code == 400 and gen.json()["error"]["param"] == "image_data", gen.text
    assert chat_r.status_code == 400 and "image_url" in chat_r.json()["error"]["message"], chat_r.text


@pytest.mark.slow
def test_chat_image_url_against_a_real_server_process(real_server: Server, hf) -> None:
    processor, greedy = hf
    image = random_image(24)
    messages = _chat_messages(image)
    client = openai.OpenAI(base_url=f"{real_server.url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_NEW, temperature=0)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert r.choices[0].message.content == processor.tokenizer.decode(greedy(text, [image]))
