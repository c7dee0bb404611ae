"""POST /v1/chat/completions: messages -> the chat template -> n choices, streamed or not.

The prompt is built by `TokenizerManager.apply_chat_template` (the tokenizer's template, or
--chat-template), so the server and the offline API format conversations identically.

A stream sends, per choice: a first chunk with `delta.role`, content deltas, then a chunk with
`finish_reason`; then, with `stream_options.include_usage`, one chunk with `usage` and no choices; then
`data: [DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from radixlm.frontend.inputs import check_prompt_chars
from radixlm.server.errors import APIError
from radixlm.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
)
from radixlm.server.serving import (
    Delta,
    Output,
    ServerContext,
    SSEResponse,
    abort_message,
    collect_unless_disconnected,
    deltas,
    engine_rids,
    new_request_id,
    openai_finish,
    sse_body,
    sse_event,
    token_texts,
    usage_of,
    without_stop_token,
)


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, raw: Request) -> Response:
    arrival = time.perf_counter()
    ctx.check_model(req.model)
    engine = ctx.require_engine()
    params = req.sampling_params(ctx.context_length, ctx.sampling_defaults)
    ctx.check_n(params.n)
    messages = req.template_messages()
    try:
        check_prompt_chars(
            sum(len(m["content"]) for m in messages),
            engine.model_info,
            engine.tokenizer_manager.max_chars_per_token,
        )
        # Off the event loop: a long conversation takes seconds to render and encode.
        input_ids = await run_in_threadpool(
            engine.tokenizer_manager.apply_chat_template,
            messages,
            add_generation_prompt=req.add_generation_prompt,
            template_kwargs=req.chat_template_kwargs,
        )
    except ValueError as exc:  # too long, no template, or the template rejected the conversation
        raise APIError(400, str(exc), param="messages") from exc
    except Exception as exc:  # jinja raises its own errors (raise_exception in templates)
        raise APIError(400, f"the chat template failed on these messages: {exc}", param="messages") from exc
    request_id = req.rid or new_request_id("chatcmpl")
    rids = engine_rids(request_id, params.n)
    top_n = req.top_logprobs or 0
    stream = await ctx.open_stream(
        {
            "input_ids": input_ids,
            "sampling_params": params,
            "return_logprob": req.logprobs,
            "top_logprobs_num": top_n,
        },
        rids,
        [request_id],
        arrival,
    )
    outputs = {rid: Output(rid) for rid in rids}
    model = ctx.served_model_name  # whatever name the caller used (SGLang reports its own)
    if req.stream:
        return SSEResponse(sse_body(stream, _events(ctx, req, stream, outputs, rids, model, request_id)))
    if not await collect_unless_disconnected(raw, stream, outputs):
        return Response(status_code=499)
    ordered = [outputs[rid] for rid in rids]
    choices = []
    for j, out in enumerate(ordered):
        ctx.check_failed(out.finish_reason, len(out.output_ids))
        finish, matched = openai_finish(out.finish_reason)
        logprobs = None
        if req.logprobs:
            delta = Delta(out.text, out.output_ids, out.logprobs, out.top_logprobs, out.finish_reason)
            logprobs = _logprobs(engine, without_stop_token(delta, req.keeps_stop))
        choices.append(
            ChatChoice(
                index=j,
                message=ChatMessageOut(content=out.text),
                logprobs=logprobs,
                finish_reason=finish,
                matched_stop=matched,
                abort_message=abort_message(out.finish_reason),
            )
        )
    body = ChatCompletionResponse(
        id=request_id, model=model, choices=choices, usage=usage_of(ordered, params.n)
    )
    return JSONResponse(body.model_dump(mode="json"))


async def _events(
    ctx: ServerContext,
    req: ChatCompletionRequest,
    stream: Any,
    outputs: dict[str, Output],
    rids: list[str],
    model: str,
    request_id: str,
) -> AsyncIterator[bytes]:
    engine = ctx.engine
    index = {rid: j for j, rid in enumerate(rids)}
    created = int(time.time())
    ordered = [outputs[rid] for rid in rids]
    n = len(rids)

    def chunk(choices: list[ChatChunkChoice], usage: Any = None) -> bytes:
        body = ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage)
        data = body.model_dump(mode="json")
        for c in data["choices"]:
            # A delta carries only what changed: {"role": ...} first, then {"content": ...}, then {}.
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
        return sse_event(data)

    for j in range(n):
        yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))])
    async for out, delta in deltas(ctx, stream, outputs):
        if delta.shows_nothing(req.logprobs):
            continue
        finish, matched = openai_finish(delta.finish_reason)
        choice = ChatChunkChoice(
            index=index[out.rid],
            delta=DeltaMessage(content=delta.text or None),
            logprobs=_logprobs(engine, without_stop_token(delta, req.keeps_stop)) if req.logprobs else None,
            finish_reason=finish,
            matched_stop=matched,
            abort_message=abort_message(delta.finish_reason),
        )
        # usage_of counts each prompt once: all choices here share one prompt, so n is len(rids).
        yield chunk([choice], usage_of(ordered, n) if req.continuous_usage else None)
    if req.include_usage:
        yield chunk([], usage_of(ordered, n))


def _logprobs(engine: Any, delta: Delta) -> ChoiceLogprobs:
    texts, top_texts = token_texts(engine, delta)
    content = []
    for i, ((lp, _, _), text) in enumerate(zip(delta.logprobs, texts)):
        tops = delta.top_logprobs[i] if i < len(delta.top_logprobs) else []
        names = top_texts[i] if i < len(top_texts) else []
        content.append(
            TokenLogprob(
                token=text,
                logprob=lp,
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(token=t, logprob=v, bytes=list(t.encode()))
                    for (v, _, _), t in zip(tops, names)
                ],
            )
        )
    return ChoiceLogprobs(content=content)
