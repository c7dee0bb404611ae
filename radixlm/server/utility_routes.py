"""Small routes SGLang's and vLLM's clients, load balancers and probes call besides generation.

    POST /tokenize, /v1/tokenize        {"prompt": str | [str]} or {"messages": [...]} -> {"tokens", "count",
                                        "max_model_len"} (a list of each for a list of prompts)
    POST /detokenize, /v1/detokenize    {"tokens": [ids] | [[ids]]} -> {"text", "prompt"} (SGLang names the
                                        result `text`, vLLM `prompt`: both are sent)
    GET  /version                       {"version": radixlm's version}
    GET  /get_load                      SGLang's load report: one entry per data-parallel rank (one here)
    GET  /load                          vLLM's: {"server_load": requests running or waiting}
    GET|POST /ping                      SageMaker's probe: 200 while the engine runs, else 503
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

import radixlm
from radixlm.server.errors import APIError
from radixlm.server.protocol import DetokenizeRequest, TokenizeRequest
from radixlm.server.serving import ServerContext


def add_utility_routes(
    open_routes: APIRouter,
    routes: APIRouter,
    ctx: ServerContext,
    server_info: Callable[[], Awaitable[dict[str, Any]]],
) -> None:
    """`open_routes` need no API key (probes); `server_info` reads the engine's live counters."""

    @open_routes.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        ctx.require_engine()
        return Response(status_code=200)

    @routes.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": radixlm.__version__})

    @routes.post("/tokenize")
    @routes.post("/v1/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        ctx.check_model(body.model)
        engine = ctx.require_engine()
        # Off the event loop: a long text takes a while to encode (and a template to render).
        ids = await run_in_threadpool(_tokenize, engine.tokenizer_manager, body)
        context = ctx.context_length
        if isinstance(body.prompt, list):
            return JSONResponse({"tokens": ids, "count": [len(t) for t in ids], "max_model_len": context})
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": context})

    @routes.post("/detokenize")
    @routes.post("/v1/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        ctx.check_model(body.model)
        engine = ctx.require_engine()
        seqs = body.tokens if body.tokens and isinstance(body.tokens[0], list) else [body.tokens]
        vocab = int(engine.model_info["vocab_size"])
        for seq in seqs:
            bad = next((t for t in seq if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"tokens holds {bad}, outside the vocabulary [0, {vocab})", param="tokens")
        texts = await run_in_threadpool(
            engine.tokenizer_manager.detokenizer.decode_batch,
            seqs,
            skip_special_tokens=body.skip_special_tokens,
        )
        text: str | list[str] = texts if seqs is body.tokens else texts[0]
        return JSONResponse({"text": text, "prompt": text})

    @routes.get("/get_load")
    async def get_load() -> JSONResponse:
        info = await server_info()
        running, waiting = int(info.get("num_running", 0)), int(info.get("num_waiting", 0))
        return JSONResponse(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": running + waiting,
                    "num_waiting_reqs": waiting,
                    "num_tokens": int(info.get("kv_used", 0)),
                }
            ]
        )

    @routes.get("/load")
    async def load() -> JSONResponse:
        info = await server_info()
        return JSONResponse({"server_load": int(info.get("num_running", 0)) + int(info.get("num_waiting", 0))})


def _tokenize(tokenizer_manager: Any, body: TokenizeRequest) -> list[int] | list[list[int]]:
    if body.messages is not None:
        try:
            return tokenizer_manager.apply_chat_template(
                [m.to_template() for m in body.messages],
                add_generation_prompt=body.add_generation_prompt,
                template_kwargs=body.chat_template_kwargs,
                tools=[t.to_template() for t in body.tools] if body.tools else None,
            )
        except Exception as exc:  # no template, or jinja's own errors
            raise APIError(400, f"the chat template failed on these messages: {exc}", param="messages") from exc
    if isinstance(body.prompt, list):
        return [tokenizer_manager.encode(p, add_special_tokens=body.add_special_tokens) for p in body.prompt]
    return tokenizer_manager.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
