"""POST /generate: SGLang's native route, answering with the Engine's own dicts.

Not streamed: what `Engine.generate` returns, a dict for one prompt (n=1), else a list in prompt-major
order. Streamed: SSE `data:` events, each the *cumulative* state of one output so far (its whole text and
output_ids, like SGLang's /generate, so a client can replace rather than append), with `index` the prompt
index and `meta_info.id` naming the output; then `data: [DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from radixlm.server.errors import APIError
from radixlm.server.protocol import GenerateRequest
from radixlm.server.serving import (
    ChunkStream,
    Output,
    ServerContext,
    SSEResponse,
    collect_unless_disconnected,
    deltas,
    engine_rids,
    new_request_id,
    sse_body,
    sse_event,
)


def _rids(req: GenerateRequest, samples: list[int]) -> tuple[list[str], list[str]]:
    """Engine ids (one per prompt and sample) and the keys /abort_request accepts for them."""
    if isinstance(req.rid, list):
        if len(req.rid) != len(samples):
            raise APIError(400, f"rid has {len(req.rid)} entries for {len(samples)} prompts", param="rid")
        rids = [r for rid, n in zip(req.rid, samples) for r in engine_rids(rid, n)]
        return rids, list(req.rid)
    base = req.rid or new_request_id("gen")
    return engine_rids(base, sum(samples)), [base]


async def generate(ctx: ServerContext, req: GenerateRequest, raw: Request) -> Response:
    arrival = time.perf_counter()
    ctx.require_engine()
    params = req.sampling_params_list(ctx.sampling_defaults)
    for p in params:
        ctx.check_n(p.n, "sampling_params.n")
    rids, keys = _rids(req, [p.n for p in params])
    prompt = {"prompt": req.text} if req.text is not None else {"input_ids": req.input_ids}
    stream = await ctx.open_stream(
        {
            **prompt,
            "sampling_params": params if isinstance(req.sampling_params, list) else params[0],
            "return_logprob": req.return_logprob,
            "top_logprobs_num": req.top_logprobs_num,
            "logprob_start_len": req.logprob_start_len,
            **({"image_data": req.image_data} if req.image_data is not None else {}),
        },
        rids,
        keys,
        arrival,
    )
    outputs = {rid: Output(rid) for rid in rids}
    texts = TokenTexts(ctx.engine) if req.return_logprob and req.return_text_in_logprobs else None
    if req.stream:
        return SSEResponse(sse_body(stream, _events(ctx, stream, outputs, req.return_logprob, texts)))
    if not await collect_unless_disconnected(raw, stream, outputs):
        return Response(status_code=499)
    results = [_result(outputs[rid], req.return_logprob, texts) for rid in rids]
    for r in results:
        ctx.check_failed(r["meta_info"].get("finish_reason"), len(r["output_ids"]))
    return JSONResponse(results[0] if req.single and len(results) == 1 else results)


async def _events(
    ctx: ServerContext,
    stream: ChunkStream,
    outputs: dict[str, Output],
    return_logprob: bool,
    texts: TokenTexts | None,
) -> AsyncIterator[bytes]:
    async for out, _ in deltas(ctx, stream, outputs):
        yield sse_event(_result(out, return_logprob, texts))


def _result(out: Output, return_logprob: bool, texts: TokenTexts | None) -> dict[str, Any]:
    result = out.final_dict(return_logprob)
    if texts is not None:
        meta = result["meta_info"]
        meta["output_token_logprobs"] = texts.fill(meta["output_token_logprobs"])
        meta["output_top_logprobs"] = [texts.fill(row) for row in meta["output_top_logprobs"]]
        meta["input_token_logprobs"] = texts.fill(meta["input_token_logprobs"])
        # Position 0 has no alternatives (None), like its logprob.
        meta["input_top_logprobs"] = [
            row if row is None else texts.fill(row) for row in meta["input_top_logprobs"]
        ]
    return result


class TokenTexts:
    """SGLang's return_text_in_logprobs: each [logprob, token id, None] entry gets its token's text (as
    the token decodes on its own). Texts are kept by id, so a stream decodes each id once."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._texts: dict[int, str] = {}

    def fill(self, entries: list[list[Any]]) -> list[list[Any]]:
        new = list(dict.fromkeys(int(e[1]) for e in entries if int(e[1]) not in self._texts))
        if new:
            self._texts.update(zip(new, self._engine.tokenizer_manager.token_texts(new)))
        return [[e[0], e[1], self._texts[int(e[1])]] for e in entries]
