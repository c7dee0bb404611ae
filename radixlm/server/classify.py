"""POST /v1/classify (SGLang's) and /classify (vLLM's): a *ForSequenceClassification model's labels.

    {"model", "input": str | [str] | [int] | [[int]], "user"} ->
    {"id": "classify-...", "object": "list", "created", "model",
     "data": [{"index", "label", "probs", "num_classes"}],
     "usage": {"prompt_tokens", "total_tokens", "completion_tokens": 0, "prompt_tokens_details": null}}

The core returns each prompt's logits (the head over the pooled state, model/transformers_backend/
encoder.py); here they become probabilities (softmax) and the label is config.id2label of the most
likely class, as vLLM and SGLang do.
"""

from __future__ import annotations

import math
import time
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import field_validator

from radixlm.server.errors import APIError
from radixlm.server.openai_embeddings import _check_inputs, encode_inputs
from radixlm.server.protocol import _Strict
from radixlm.server.serving import ServerContext, new_request_id


class ClassifyRequest(_Strict):
    model: str | None = None
    input: Any
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        return _check_inputs(value)


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


async def create_classification(ctx: ServerContext, body: ClassifyRequest) -> JSONResponse:
    ctx.check_model(body.model)
    info = ctx.require_engine().model_info
    if info.get("task") != "classify":
        raise APIError(
            400,
            f"{info.get('architecture')} is not a classification model (task {info.get('task', 'generate')!r}); "
            "/v1/classify needs a *ForSequenceClassification checkpoint",
            param="model",
        )
    labels = list(info.get("labels") or [])
    results = await encode_inputs(ctx, body.input, "input")
    data = []
    for i, r in enumerate(results):
        probs = softmax(r["embedding"])
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append(
            {
                "index": i,
                "label": labels[best] if best < len(labels) else None,
                "probs": probs,
                "num_classes": len(probs),
            }
        )
    tokens = sum(r["meta_info"]["prompt_tokens"] for r in results)
    return JSONResponse(
        {
            "id": new_request_id("classify"),
            "object": "list",
            "created": int(time.time()),
            "model": ctx.served_model_name,
            "data": data,
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
    )
