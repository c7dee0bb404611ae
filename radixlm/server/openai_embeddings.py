"""Pooling routes over Engine.async_encode: OpenAI's /v1/embeddings and SGLang's native /encode.

    POST /v1/embeddings  {"model", "input": str | [str] | [int] | [[int]], "encoding_format": "float" | "base64",
                          "dimensions": only the model's own, "user"} -> {"object": "list", "data": [{"object":
                          "embedding", "index", "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}
    POST /encode         SGLang's: {"text": str | [str]} or {"input_ids": [int] | [[int]]}, "rid"
                          -> the Engine's dicts ({"embedding", "meta_info"}; a list for a list)

base64 is the little-endian float32 bytes of the vector, as OpenAI sends it (the official client asks for
base64 by default and decodes it with numpy). A model that generates answers these routes with a 400 naming
its task, as a pooling model does /v1/completions. Nothing streams: each call returns when every input's
prompt has been pooled.
"""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import field_validator, model_validator

from radixlm.server.errors import APIError
from radixlm.server.protocol import _check_prompt, _Strict
from radixlm.server.serving import ServerContext

MAX_INPUTS = 2048  # OpenAI's own limit on the number of inputs of one embeddings request


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        return _check_inputs(value)


class EncodeRequest(_Strict):
    """SGLang's native /encode body (the fields radixlm implements)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    rid: str | list[str] | None = None

    @model_validator(mode="after")
    def _one_prompt_field(self) -> EncodeRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text and input_ids")
        _check_inputs(self.text if self.text is not None else self.input_ids)
        return self


def _check_inputs(value: Any) -> Any:
    value = _check_prompt(value)
    if isinstance(value, list) and value and isinstance(value[0], (str, list)) and len(value) > MAX_INPUTS:
        raise ValueError(f"holds {len(value)} inputs; at most {MAX_INPUTS} per request")
    if isinstance(value, str) and not value:
        raise ValueError("must not be an empty string")
    if isinstance(value, list) and any(isinstance(p, (str, list)) and len(p) == 0 for p in value):
        raise ValueError("must not hold an empty string or an empty token list")
    return value


def engine_prompt(value: Any) -> tuple[dict[str, Any], bool]:
    """The Engine's keyword (`prompt` for text, `input_ids` for ids) as a list, and whether it was one."""
    if isinstance(value, str):
        return {"prompt": [value]}, True
    if value and all(isinstance(t, int) for t in value):
        return {"input_ids": [value]}, True
    key = "prompt" if isinstance(value[0], str) else "input_ids"
    return {key: list(value)}, False


async def encode_inputs(ctx: ServerContext, value: Any, param: str, rid: Any = None) -> list[dict[str, Any]]:
    """Engine.async_encode over one request's inputs: every prompt check of the Engine is a 400 naming
    `param`; a model that does not pool is a 400 too (its task named)."""
    engine = ctx.require_engine()
    kwargs, _ = engine_prompt(value)
    if rid is not None:
        kwargs["rid"] = rid if isinstance(rid, list) else [rid]
    try:
        return await engine.async_encode(**kwargs)
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from exc


def _vector(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


async def create_embeddings(ctx: ServerContext, body: EmbeddingRequest) -> JSONResponse:
    ctx.check_model(body.model)
    engine = ctx.require_engine()
    info = engine.model_info
    if info.get("task") == "classify":
        raise APIError(
            400, f"{info.get('architecture')} is a classification model; use /v1/classify", param="model"
        )
    results = await encode_inputs(ctx, body.input, "input")
    dim = len(results[0]["embedding"]) if results else 0
    if body.dimensions is not None and body.dimensions != dim:
        raise APIError(
            400,
            f"dimensions is {body.dimensions}; this model's embeddings have {dim} dimensions and it does not "
            "support others (no matryoshka truncation)",
            param="dimensions",
        )
    tokens = sum(r["meta_info"]["prompt_tokens"] for r in results)
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(r["embedding"], body.encoding_format)}
        for i, r in enumerate(results)
    ]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": ctx.served_model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def native_encode(ctx: ServerContext, body: EncodeRequest) -> JSONResponse:
    value = body.text if body.text is not None else body.input_ids
    param = "text" if body.text is not None else "input_ids"
    results = await encode_inputs(ctx, value, param, body.rid)
    _, single = engine_prompt(value)
    return JSONResponse(results[0] if single else results)
