"""POST /v1/completions: prompts (text or token ids) x n samples -> choices, streamed or not.

Choice `index` is prompt-major, as OpenAI numbers them: prompt i, sample k -> i * n + k. Each choice is
one Engine request whose id is `<response id>-<index>` (or the response id itself when there is one).

`echo` with `logprobs` lists the prompt's tokens first, with their prompt logprobs (the first token's is
null: nothing comes before it), as OpenAI's legacy completions and vLLM do.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from radixlm.server import structured_output
from radixlm.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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


async def create_completion(ctx: ServerContext, req: CompletionRequest, raw: Request) -> Response:
    arrival = time.perf_counter()
    ctx.check_model(req.model)
    engine = ctx.require_engine()
    params = req.sampling_params(ctx.sampling_defaults)
    ctx.check_n(params.n)
    # Off the event loop: parsing a large schema (or the first import of xgrammar) takes a while.
    await run_in_threadpool(structured_output.check_compiles, params, req.constraint(), engine.model_info)
    request_id = req.rid or new_request_id("cmpl")
    rids = engine_rids(request_id, req.num_prompts * params.n)
    return_logprob = req.logprobs is not None
    stream = await ctx.open_stream(
        {
            **req.engine_prompt(),
            "sampling_params": params,
            "return_logprob": return_logprob,
            "top_logprobs_num": req.logprobs or 0,
            "logprob_start_len": 0 if req.echo and return_logprob else -1,
        },
        rids,
        [request_id],
        arrival,
    )
    outputs = {rid: Output(rid) for rid in rids}
    prefixes = _echo_prefixes(engine, req, params.n) if req.echo else [""] * len(rids)
    model = ctx.served_model_name  # whatever name the caller used (SGLang reports its own)
    if req.stream:
        events = _events(ctx, req, stream, outputs, rids, prefixes, model, request_id, params.n)
        return SSEResponse(sse_body(stream, events))
    if not await collect_unless_disconnected(raw, stream, outputs):
        return Response(status_code=499)
    ordered = [outputs[rid] for rid in rids]
    choices = []
    for j, out in enumerate(ordered):
        ctx.check_failed(out.finish_reason, len(out.output_ids))
        finish, matched = openai_finish(out.finish_reason)
        logprobs = None
        if return_logprob:
            delta = Delta(out.text, out.output_ids, out.logprobs, out.top_logprobs, out.finish_reason)
            delta = without_stop_token(delta, req.keeps_stop)
            logprobs = _logprobs(engine, delta, req.logprobs or 0, offset=len(prefixes[j]))
            if req.echo:
                logprobs = _joined(_prompt_logprobs(engine, out, req.logprobs or 0), logprobs)
        choices.append(
            CompletionChoice(
                index=j,
                text=prefixes[j] + out.text,
                logprobs=logprobs,
                finish_reason=finish,
                matched_stop=matched,
                abort_message=abort_message(out.finish_reason),
            )
        )
    body = CompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of(ordered, params.n))
    return JSONResponse(body.model_dump(mode="json"))


async def _events(
    ctx: ServerContext,
    req: CompletionRequest,
    stream: Any,
    outputs: dict[str, Output],
    rids: list[str],
    prefixes: list[str],
    model: str,
    request_id: str,
    n: int,
) -> AsyncIterator[bytes]:
    engine = ctx.engine
    index = {rid: j for j, rid in enumerate(rids)}
    offsets = [len(p) for p in prefixes]
    created = int(time.time())
    ordered = [outputs[rid] for rid in rids]

    def chunk(choices: list[CompletionChoice], usage: Any = None) -> bytes:
        body = CompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage)
        return sse_event(body.model_dump(mode="json"))

    # With logprobs, an echoed prompt waits for its output's first chunk, which carries its prompt logprobs.
    echo_logprobs = req.echo and req.logprobs is not None
    for j, prefix in enumerate(prefixes):
        if prefix and not echo_logprobs:
            yield chunk([CompletionChoice(index=j, text=prefix)])
    echo_due = set(range(len(rids))) if echo_logprobs else set()
    async for out, delta in deltas(ctx, stream, outputs):
        j = index[out.rid]
        if j in echo_due:
            echo_due.discard(j)
            prompt = _prompt_logprobs(engine, out, req.logprobs or 0)
            yield chunk([CompletionChoice(index=j, text=prefixes[j], logprobs=prompt)])
        if delta.shows_nothing(req.logprobs is not None):
            continue
        finish, matched = openai_finish(delta.finish_reason)
        logprobs = None
        if req.logprobs is not None:
            logprobs = _logprobs(engine, without_stop_token(delta, req.keeps_stop), req.logprobs, offset=offsets[j])
            offsets[j] += len(delta.text)
        choice = CompletionChoice(
            index=j,
            text=delta.text,
            logprobs=logprobs,
            finish_reason=finish,
            matched_stop=matched,
            abort_message=abort_message(delta.finish_reason),
        )
        yield chunk([choice], usage_of(ordered, n) if req.continuous_usage else None)
    if req.include_usage:
        yield chunk([], usage_of(ordered, n))


def _echo_prefixes(engine: Any, req: CompletionRequest, n: int) -> list[str]:
    """The prompt text to put before each choice's output (token-id prompts are decoded)."""
    p = req.prompt
    prompts = [p] if isinstance(p, str) or isinstance(p[0], int) else p
    texts = [
        q if isinstance(q, str) else engine.tokenizer_manager.decode(q, skip_special_tokens=False)
        for q in prompts
    ]
    return [t for t in texts for _ in range(n)]


def _prompt_logprobs(engine: Any, out: Output, top_n: int) -> CompletionLogprobs:
    """The prompt's tokens and their logprobs (the Engine's input_token_logprobs), from text offset 0."""
    entries = out.meta.get("input_token_logprobs", [])
    tops = out.meta.get("input_top_logprobs", [])
    # The first token has no logprob and no alternatives: null in both lists.
    prompt = Delta("", [e[1] for e in entries], entries, [row or [] for row in tops], None)
    logprobs = _logprobs(engine, prompt, top_n, offset=0)
    if logprobs.top_logprobs and entries and entries[0][0] is None:
        logprobs.top_logprobs[0] = None
    return logprobs


def _joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=None if first.top_logprobs is None else first.top_logprobs + (then.top_logprobs or []),
        text_offset=first.text_offset + then.text_offset,
    )


def _logprobs(engine: Any, delta: Delta, top_n: int, offset: int) -> CompletionLogprobs:
    """The legacy completions format: parallel lists per token, top_logprobs as {token: logprob}."""
    tokens, top_texts = token_texts(engine, delta)
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    tops = None
    if top_n:
        tops = [
            {t: lp for (lp, _, _), t in zip(entry, names)}
            for entry, names in zip(delta.top_logprobs, top_texts)
        ]
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[entry[0] for entry in delta.logprobs],
        top_logprobs=tops,
        text_offset=offsets,
    )
