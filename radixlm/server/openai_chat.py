"""POST /v1/chat/completions: messages -> the chat template -> n choices, streamed or not.

The prompt is built by `TokenizerManager.apply_chat_template` (the tokenizer's template, or
--chat-template), so the server and the offline API format conversations identically.

A stream sends, per choice: a first chunk with `delta.role`, content deltas, then a chunk with
`finish_reason`; then, with `stream_options.include_usage`, one chunk with `usage` and no choices; then
`data: [DONE]`.

Tools and reasoning (chat_output.py): each choice's text goes through the reasoning parser and the tool-call
parser its tool_choice needs, so deltas carry `reasoning_content`, `content` and `tool_calls` pieces, and a
choice that made calls finishes with "tool_calls".
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from radixlm.frontend.inputs import check_prompt_chars
from radixlm.frontend.multimodal import chat_images
from radixlm.server import structured_output
from radixlm.server.chat_output import ChoiceOutput, make_choice_output
from radixlm.server.errors import APIError
from radixlm.server.parsers.tool_call import ToolCallDelta
from radixlm.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    DeltaMessage,
    FunctionCallOut,
    TokenLogprob,
    ToolCallOut,
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
    # Off the event loop: parsing a large schema (or the first import of xgrammar) takes a while.
    await run_in_threadpool(structured_output.check_compiles, params, req.constraint(), engine.model_info)
    messages = req.template_messages()
    if chat_images(messages):  # a vision-language request: the processor renders and places the images
        return await _create_image_chat(ctx, req, raw, engine, params, messages, arrival)
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
            tools=req.template_tools(),
        )
    except ValueError as exc:  # too long, no template, or the template rejected the conversation
        raise APIError(400, str(exc), param="messages") from exc
    except Exception as exc:  # jinja raises its own errors (raise_exception in templates)
        raise APIError(400, f"the chat template failed on these messages: {exc}", param="messages") from exc
    return await _complete(ctx, req, raw, engine, params, {"input_ids": input_ids}, input_ids, arrival)


async def _create_image_chat(
    ctx: ServerContext, req: ChatCompletionRequest, raw: Request, engine: Any, params: Any, messages: list, arrival: float
) -> Response:
    processor = engine.image_processor()
    if processor is None:
        raise APIError(400, "image_url: this model takes no images (it is not a vision-language model)", param="messages")
    try:
        text = await run_in_threadpool(processor.render_chat, messages, req.chat_template_kwargs)
    except Exception as exc:  # jinja raises its own errors
        raise APIError(400, f"the chat template failed on these messages: {exc}", param="messages") from exc
    prompt = {"prompt": text, "image_data": [chat_images(messages)]}
    return await _complete(ctx, req, raw, engine, params, prompt, None, arrival)


async def _complete(
    ctx: ServerContext,
    req: ChatCompletionRequest,
    raw: Request,
    engine: Any,
    params: Any,
    prompt: dict[str, Any],
    input_ids: list[int] | None,
    arrival: float,
) -> Response:
    """The completion of a rendered prompt (ids, or text with its images): streamed or collected."""
    request_id = req.rid or new_request_id("chatcmpl")
    rids = engine_rids(request_id, params.n)
    top_n = req.top_logprobs or 0
    stream = await ctx.open_stream(
        {
            **prompt,
            "sampling_params": params,
            "return_logprob": req.logprobs,
            "top_logprobs_num": top_n,
        },
        rids,
        [request_id],
        arrival,
    )
    outputs = {rid: Output(rid) for rid in rids}
    opens = _prompt_opens_reasoning(engine, input_ids) if ctx.reasoning_parser and input_ids else False
    parsed = {rid: _choice_output(ctx, req, opens) for rid in rids}
    model = ctx.served_model_name  # whatever name the caller used (SGLang reports its own)
    if req.stream:
        events = _events(ctx, req, stream, outputs, parsed, rids, model, request_id)
        return SSEResponse(sse_body(stream, events))
    if not await collect_unless_disconnected(raw, stream, outputs):
        return Response(status_code=499)
    ordered = [outputs[rid] for rid in rids]
    choices = []
    for j, out in enumerate(ordered):
        ctx.check_failed(out.finish_reason, len(out.output_ids))
        finish, matched = openai_finish(out.finish_reason)
        message = _message(parsed[out.rid], out.text)
        if message.tool_calls and finish == "stop":
            finish = "tool_calls"
        logprobs = None
        if req.logprobs:
            delta = Delta(out.text, out.output_ids, out.logprobs, out.top_logprobs, out.finish_reason)
            logprobs = _logprobs(engine, without_stop_token(delta, req.keeps_stop))
        choices.append(
            ChatChoice(
                index=j,
                message=message,
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
    parsed: dict[str, ChoiceOutput],
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
        p = parsed[out.rid]
        piece = p.feed(delta.text)
        if delta.finish_reason is not None:
            piece = piece.merge(p.finish())
        elif not piece and not (req.logprobs and delta.token_ids):
            continue  # held back (a marker may be starting); nothing to show yet
        finish, matched = openai_finish(delta.finish_reason)
        if finish == "stop" and p.num_calls:
            finish = "tool_calls"
        choice = ChatChunkChoice(
            index=index[out.rid],
            delta=DeltaMessage(
                content=piece.content or None,
                reasoning_content=piece.reasoning or None,
                tool_calls=[c.to_openai() for c in piece.calls] or None,
            ),
            logprobs=_logprobs(engine, without_stop_token(delta, req.keeps_stop)) if req.logprobs else None,
            finish_reason=finish,
            matched_stop=matched,
            abort_message=abort_message(delta.finish_reason),
        )
        # usage_of counts each prompt once: all choices here share one prompt, so n is len(rids).
        yield chunk([choice], usage_of(ordered, n) if req.continuous_usage else None)
    if req.include_usage:
        yield chunk([], usage_of(ordered, n))


def _choice_output(ctx: ServerContext, req: ChatCompletionRequest, prompt_opens_reasoning: bool) -> ChoiceOutput:
    named = req.tool_choice.function.name if req.tool_mode == "named" else None
    return make_choice_output(
        tool_mode=req.tool_mode,
        tool_parser=ctx.tool_call_parser,
        named_tool=named,
        reasoning_parser=ctx.reasoning_parser,
        separate_reasoning=req.separate_reasoning,
        stream_reasoning=req.stream_reasoning,
        prompt_opens_reasoning=prompt_opens_reasoning,
    )


def _prompt_opens_reasoning(engine: Any, input_ids: list[int]) -> bool:
    """The template ended the prompt inside a think block (DeepSeek-R1's, Qwen3 thinking models')."""
    tail = engine.tokenizer_manager.decode(input_ids[-8:], skip_special_tokens=False)
    return tail.rstrip().endswith("<think>")


def _message(parsed: ChoiceOutput, text: str) -> ChatMessageOut:
    d = parsed.feed(text).merge(parsed.finish())
    calls = _joined_calls(d.calls)
    return ChatMessageOut(
        # OpenAI sends null content beside tool calls when the model wrote nothing else
        content=None if calls and not d.content.strip() else d.content,
        reasoning_content=d.reasoning or None,
        tool_calls=calls or None,
    )


def _joined_calls(pieces: list[ToolCallDelta]) -> list[ToolCallOut]:
    calls: dict[int, ToolCallOut] = {}
    for p in pieces:
        call = calls.get(p.index)
        if call is None:
            calls[p.index] = ToolCallOut(id=p.id or "", function=FunctionCallOut(name=p.name or "", arguments=p.arguments))
        else:
            call.function.arguments += p.arguments
    return [calls[i] for i in sorted(calls)]


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
