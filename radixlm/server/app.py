"""FastAPI routes: OpenAI-compatible and native. Thin: parse (protocol.py), call the Engine, format.

    GET  /health              200 while the engine runs; 503 before it is ready or after its core died
    GET  /health_generate     200 after a 1-token generation succeeds
    GET  /v1/models           the served model
    POST /v1/completions      OpenAI completions (text, texts, token ids, token-id lists; stream; n; logprobs)
    POST /v1/chat/completions OpenAI chat (chat template; stream with include_usage; n; logprobs)
    POST /generate            SGLang's native route (the Engine's dicts; SSE when streaming)
    POST /v1/embeddings       OpenAI embeddings; /encode SGLang's native one (openai_embeddings.py)
    POST /v1/classify         SGLang's and vLLM's (/classify) classification (classify.py)
    GET  /get_model_info      Engine.get_model_info(): architecture, model_impl and the reason for it, ...
                              (also /model_info, SGLang's newer name)
    GET  /get_server_info     Engine.get_server_info(): KV pool usage, cache size, queue lengths, config
                              (also /server_info)
    ...                       /tokenize, /detokenize, /version, /get_load, /load, /ping: utility_routes.py
    POST /flush_cache         empty the prefix cache (refused while requests run)
    POST /abort_request       {"rid": ...}: abort a request by its rid (or its response id)
    GET  /metrics             Prometheus text (with --enable-metrics; 404 without)

With --api-key, every route but /health and /metrics needs `Authorization: Bearer <key>`; /openapi.json
is then behind the key too, and /docs and /redoc are off.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from radixlm.config import DEFAULT_MAX_N
from radixlm.server.classify import ClassifyRequest, create_classification
from radixlm.server.errors import APIError, install_error_handlers
from radixlm.server.metrics import CONTENT_TYPE, ServerMetrics
from radixlm.server.native import generate
from radixlm.server.openai_chat import create_chat_completion
from radixlm.server.openai_completions import create_completion
from radixlm.server.openai_embeddings import EmbeddingRequest, EncodeRequest, create_embeddings, native_encode
from radixlm.server.parsers import check_reasoning_parser, resolve_tool_call_parser
from radixlm.server.protocol import (
    AbortRequestBody,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    ModelCard,
    ModelList,
)
from radixlm.server.serving import ServerContext, dead_reason, engine_alive
from radixlm.server.utility_routes import add_utility_routes

logger = logging.getLogger("radixlm.server")

HEALTH_GENERATE_TIMEOUT_S = 20.0


def create_app(
    engine: Any,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    enable_metrics: bool = False,
    shutdown_engine: bool = True,
    strict_model_name: bool = False,
    metrics_prefixes: tuple[str, ...] = (),
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
) -> FastAPI:
    """An app over a built Engine. `shutdown_engine`: shut the Engine down when the app stops.
    `strict_model_name`: a request naming another model is a 404 (by default any name is served).
    `metrics_prefixes`: other servers' metric names to export too (e.g. "sglang"), see metrics.py.
    `tool_call_parser` / `reasoning_parser`: names in server/parsers (the tool format defaults to the one
    the chat template writes, when that is unambiguous)."""
    model_path = str(engine.model_info.get("model_path", "")) if engine is not None else ""
    name = served_model_name or model_path or "radixlm"
    ctx = ServerContext(
        engine=engine,
        served_model_name=name,
        api_key=api_key or None,
        metrics=ServerMetrics(name, extra_prefixes=metrics_prefixes) if enable_metrics else None,
        model_aliases={model_path} if model_path else set(),
        max_n=_engine_max_n(engine),
        strict_model_name=strict_model_name,
        sampling_defaults=dict(getattr(engine, "sampling_defaults", None) or {}),
        tool_call_parser=resolve_tool_call_parser(tool_call_parser, engine),
        reasoning_parser=check_reasoning_parser(reasoning_parser),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if shutdown_engine and ctx.engine is not None:
            # Uvicorn runs this on SIGTERM/SIGINT: stop the core (and its process) before we exit.
            logger.info("shutting down the engine")
            await run_in_threadpool(ctx.engine.shutdown)

    # With --api-key the schema is served behind the key and the HTML docs are off: a browser page
    # cannot send the key, and an open schema tells anyone what the server accepts.
    protect_docs = ctx.api_key is not None
    app = FastAPI(
        title="radixlm",
        lifespan=lifespan,
        openapi_url=None if protect_docs else "/openapi.json",
        docs_url=None if protect_docs else "/docs",
        redoc_url=None if protect_docs else "/redoc",
    )
    app.state.ctx = ctx
    install_error_handlers(app)

    async def require_api_key(request: Request) -> None:
        if ctx.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), ctx.api_key.encode()
        ):
            raise APIError(
                401, "invalid or missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key"
            )

    open_routes = APIRouter()
    routes = APIRouter(dependencies=[Depends(require_api_key)])

    @open_routes.get("/health")
    async def health() -> Response:
        ctx.require_engine()
        return Response(status_code=200)

    @open_routes.get("/metrics")
    async def metrics() -> Response:
        if ctx.metrics is None:
            raise APIError(404, "metrics are off; start the server with --enable-metrics")
        if ctx.engine is not None and engine_alive(ctx.engine):
            try:
                ctx.metrics.refresh(await run_in_threadpool(ctx.engine.get_server_info))
            except Exception as exc:  # a scrape must not fail because the core is busy or gone
                logger.warning("metrics: could not read server info: %s", exc)
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @routes.get("/health_generate")
    async def health_generate() -> Response:
        engine = ctx.require_engine()
        # A pooling model cannot generate: its health check pools one token instead.
        pooling = engine.model_info.get("task", "generate") != "generate"
        try:
            await asyncio.wait_for(
                engine.async_encode(input_ids=[0])
                if pooling
                else engine.async_generate(
                    input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0.0}
                ),
                HEALTH_GENERATE_TIMEOUT_S,
            )
        except Exception as exc:
            reason = dead_reason(engine) if not engine_alive(engine) else f"{type(exc).__name__}: {exc}"
            raise APIError(503, f"the engine could not generate: {reason}", code="engine_unhealthy") from exc
        return Response(status_code=200)

    @routes.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[_model_card(ctx)]).model_dump(mode="json"))

    @routes.get("/v1/models/{model:path}")
    async def get_model(model: str) -> JSONResponse:
        ctx.check_model(model)
        return JSONResponse(_model_card(ctx).model_dump(mode="json"))

    @routes.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    @routes.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    @routes.post("/generate")
    async def generate_route(body: GenerateRequest, request: Request) -> Response:
        return await generate(ctx, body, request)

    @routes.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Response:
        return await create_embeddings(ctx, body)

    @routes.post("/encode")
    async def encode_route(body: EncodeRequest) -> Response:
        return await native_encode(ctx, body)

    @routes.post("/v1/classify")
    @routes.post("/classify")
    async def classify(body: ClassifyRequest) -> Response:
        return await create_classification(ctx, body)

    @routes.get("/get_model_info")
    @routes.get("/model_info")
    async def get_model_info() -> JSONResponse:
        engine = ctx.require_engine()
        return JSONResponse(
            {
                **engine.get_model_info(),
                "served_model_name": ctx.served_model_name,
                "core_pid": _core_pid(engine),
            }
        )

    @routes.get("/get_server_info")
    @routes.get("/server_info")
    async def get_server_info() -> JSONResponse:
        engine = ctx.require_engine()
        info = await _engine_call(ctx, engine.get_server_info)
        info.setdefault("core_pid", _core_pid(engine))
        return JSONResponse(info)

    @routes.api_route("/flush_cache", methods=["POST", "GET"])
    async def flush_cache() -> JSONResponse:
        engine = ctx.require_engine()
        result = await _engine_call(ctx, engine.flush_cache)
        if not result.get("success"):
            raise APIError(400, str(result.get("message")), code="flush_refused")
        return JSONResponse(result)

    @routes.post("/abort_request")
    async def abort_request(body: AbortRequestBody) -> JSONResponse:
        engine = ctx.require_engine()
        # A caller knows its rid or the response id; either maps to the Engine's ids. An id we never
        # saw is passed through as is (it may be an Engine id), and aborting a finished one is a no-op.
        rids = ctx.active.get(body.rid, [body.rid])
        for rid in rids:
            engine.abort_request(rid)
        return JSONResponse({"success": True, "rids": rids})

    if protect_docs:

        @routes.get("/openapi.json", include_in_schema=False)
        async def openapi_schema() -> JSONResponse:
            return JSONResponse(app.openapi())

    async def live_server_info() -> dict[str, Any]:
        return await _engine_call(ctx, ctx.require_engine().get_server_info)

    add_utility_routes(open_routes, routes, ctx, live_server_info)
    app.include_router(open_routes)
    app.include_router(routes)
    return app


def _engine_max_n(engine: Any) -> int:
    config = getattr(engine, "config", None)
    return int(getattr(config, "max_n", DEFAULT_MAX_N))


def _model_card(ctx: ServerContext) -> ModelCard:
    info = ctx.engine.model_info if ctx.engine is not None else {}
    return ModelCard(
        id=ctx.served_model_name, root=info.get("model_path"), max_model_len=info.get("context_length")
    )


def _core_pid(engine: Any) -> int | None:
    # Set by the process-based core; None when the core runs inline (a thread of this process).
    pid = getattr(engine, "core_pid", None)
    return pid if isinstance(pid, int) else None


async def _engine_call(ctx: ServerContext, fn: Any) -> dict[str, Any]:
    """A blocking control call to the core, off the event loop; a dead core is a 503."""
    try:
        return await run_in_threadpool(fn)
    except Exception as exc:
        if ctx.engine is not None and not engine_alive(ctx.engine):
            raise APIError(
                503, f"the engine is not running: {dead_reason(ctx.engine)}", code="engine_dead"
            ) from exc
        raise
