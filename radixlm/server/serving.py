"""What every generating route shares: the server's state, opening an Engine stream, reading it.

All routes read the Engine through `async_generate(stream=True)`, even when the HTTP response is not
streamed: the server then sees each token as it arrives, which is what TTFT and inter-token-latency
metrics measure, and a client that goes away is handled the same way everywhere: closing the stream
sends the Engine an abort, which frees the request's KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from radixlm.config import DEFAULT_MAX_N
from radixlm.sampling_params import short_repr
from radixlm.server.errors import APIError, error_body
from radixlm.server.metrics import ServerMetrics
from radixlm.server.protocol import PromptTokensDetails, Usage

logger = logging.getLogger("radixlm.server")

T = TypeVar("T")


def engine_alive(engine: Any) -> bool:
    is_alive = getattr(engine, "is_alive", None)
    if callable(is_alive):
        return bool(is_alive())
    # Engines from before is_alive(): the core client records why its core stopped.
    return getattr(engine._client, "dead_reason", None) is None and not getattr(engine, "_closed", False)


def dead_reason(engine: Any) -> str:
    client = getattr(engine, "_client", None)
    return getattr(client, "dead_reason", None) or "the engine was shut down"


@dataclass
class ServerContext:
    """Everything the routes need; one per app, so two servers never share state."""

    engine: Any  # radixlm.Engine; None while it is being built (requests get 503)
    served_model_name: str
    api_key: str | None = None
    metrics: ServerMetrics | None = None
    # Names a request may use for `model`: the served name and the path it was loaded from.
    model_aliases: set[str] = field(default_factory=set)
    # /abort_request: the id a caller knows (its rid, or the response id) -> the Engine's request ids.
    active: dict[str, list[str]] = field(default_factory=dict)
    strict_model_name: bool = False  # True: a `model` other than the served name (or path) is a 404
    # The model's sampling defaults (generation_config.json) for fields a request leaves unset.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    max_n: int = DEFAULT_MAX_N  # the Engine's max_n: more samples per request is a 400
    # Set when a shutdown's drain time is over: what still runs is ended with this message (a 503).
    ended_by_shutdown: str | None = None
    # server/parsers/: the tool-call format for tool_choice auto (None: none known), the reasoning format
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def check_n(self, n: int, param: str = "n") -> None:
        """Before anything loops over the samples (request ids, outputs): a huge n is refused at once."""
        if n > self.max_n:
            raise APIError(
                400,
                f"{param} is {short_repr(n)}; this server allows at most {self.max_n} samples per request "
                "(--max-n)",
                param=param,
            )

    def end_all_requests(self, message: str) -> int:
        """Abort every running request; each answers with an OpenAI-style 503 carrying `message`.
        Returns how many requests were aborted."""
        self.ended_by_shutdown = message
        rids = {rid for group in self.active.values() for rid in group}
        if self.engine is not None:
            for rid in rids:
                self.engine.abort_request(rid)
        return len(rids)

    def require_engine(self) -> Any:
        engine = self.engine
        if engine is None:
            raise APIError(503, "the engine is still starting; retry shortly", code="engine_not_ready")
        if not engine_alive(engine):
            raise APIError(503, f"the engine is not running: {dead_reason(engine)}", code="engine_dead")
        return engine

    def check_model(self, name: str | None) -> None:
        # SGLang and vLLM clients send `model="default"` or any name for a server's one model: accepted,
        # and the response names the served model. With --strict-model-name, another name is a 404.
        if not self.strict_model_name:
            return
        if name is not None and name != self.served_model_name and name not in self.model_aliases:
            raise APIError(
                404,
                f"The model {short_repr(name)} does not exist. This server serves `{self.served_model_name}`.",
                param="model",
                code="model_not_found",
            )

    @property
    def context_length(self) -> int:
        return int(self.engine.model_info["context_length"])

    async def open_stream(
        self,
        engine_kwargs: dict[str, Any],
        rids: list[str],
        keys: list[str],
        arrival: float,
    ) -> ChunkStream:
        """Start the requests; a bad input raises a 400 here, before any response byte is sent."""
        engine = self.require_engine()
        if self.ended_by_shutdown is not None:
            raise APIError(503, self.ended_by_shutdown, code="server_shutting_down")
        try:
            gen = await engine.async_generate(stream=True, rid=rids, **engine_kwargs)
        except ValueError as exc:
            # The front's messages name the sampling field they are about (sampling_params.regex, ...).
            field = re.match(r"(sampling_params\.\w+|image_data|image_url)", str(exc))
            raise APIError(400, str(exc), param=field.group(1) if field else None) from exc
        except RuntimeError as exc:
            if not engine_alive(engine):
                raise APIError(503, f"the engine is not running: {exc}", code="engine_dead") from exc
            raise
        return ChunkStream(self, gen, rids, keys, arrival)

    def check_failed(self, reason: dict[str, Any] | None, completion_tokens: int) -> None:
        """An abort the caller did not ask for is an error, with the status the engine gave it: 503 when
        the engine died or shut down, 400 when the core refused a request it cannot serve (e.g. a prompt
        larger than the KV pool) before it produced anything."""
        if not reason or reason.get("type") != "abort":
            return
        if self.ended_by_shutdown is not None:
            raise APIError(503, self.ended_by_shutdown, code="server_shutting_down")
        message = str(reason.get("message", "aborted"))
        status = reason.get("status_code")
        if status == 503 or (self.engine is not None and not engine_alive(self.engine)):
            raise APIError(503, message, code="engine_dead")
        if status == 400 and completion_tokens == 0:
            raise APIError(400, message)


def engine_rids(base: str, count: int) -> list[str]:
    """One Engine request id per prompt and sample; a single request keeps the caller's id as is."""
    return [base] if count == 1 else [f"{base}-{j}" for j in range(count)]


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChunkStream:
    """The Engine's chunk stream for one HTTP request, feeding metrics and the /abort_request registry.

    Always `aclose()` it (a finally): that aborts unfinished requests in the Engine.
    """

    def __init__(
        self, ctx: ServerContext, gen: AsyncIterator[dict], rids: list[str], keys: list[str], arrival: float
    ):
        self.ctx = ctx
        self._gen = gen
        self._rids = rids
        self._keys = keys
        self._arrival = arrival
        self._last: dict[str, float] = {}
        self._closed = False
        for key in keys:
            ctx.active[key] = rids

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        chunk = await self._gen.__anext__()
        metrics = self.ctx.metrics
        if metrics is not None:
            now = time.perf_counter()
            meta = chunk["meta_info"]
            rid = meta["id"]
            n = len(chunk["output_ids"])
            if n:
                last = self._last.get(rid)
                metrics.on_tokens(n, last is None, now - self._arrival, now - (last or now))
                self._last[rid] = now
            if meta.get("finish_reason") is not None:
                metrics.on_finish(meta, now - self._arrival)
        return chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for key in self._keys:
            if self.ctx.active.get(key) is self._rids:  # a later request may have reused the key
                del self.ctx.active[key]
        close = getattr(self._gen, "aclose", None)
        if close is not None:
            await close()


@dataclass
class Delta:
    """What one chunk added to one output."""

    text: str
    token_ids: list[int]
    logprobs: list[list[Any]]  # [logprob, token_id, None] per token
    top_logprobs: list[list[list[Any]]]  # per token, [[logprob, token_id, None], ...]
    finish_reason: dict[str, Any] | None

    def shows_nothing(self, with_logprobs: bool) -> bool:
        """True for tokens that decode to no text yet (half a UTF-8 character) and do not finish: they make
        no OpenAI chunk unless their logprobs were asked for."""
        return not self.text and self.finish_reason is None and not (with_logprobs and self.token_ids)


@dataclass
class Output:
    """One output (one prompt, one sample) accumulated from its chunks."""

    rid: str
    index: int = 0  # the Engine's prompt index
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[list[Any]] = field(default_factory=list)
    top_logprobs: list[list[list[Any]]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def finish_reason(self) -> dict[str, Any] | None:
        return self.meta.get("finish_reason")

    def add(self, chunk: dict[str, Any]) -> Delta:
        ids = list(chunk["output_ids"])
        start = len(self.output_ids)
        self.text += chunk["text"]
        self.output_ids.extend(ids)
        self.index = chunk.get("index", self.index)
        meta = chunk["meta_info"]
        # The Engine's logprob lists grow with the request (the chunk holds the live list), so take
        # exactly this chunk's tokens by position rather than the list's current tail.
        lps = meta.get("output_token_logprobs", [])[start : start + len(ids)]
        tops = meta.get("output_top_logprobs", [])[start : start + len(ids)]
        self.logprobs.extend(lps)
        self.top_logprobs.extend(tops)
        self.meta = {
            k: v for k, v in meta.items() if k not in ("output_token_logprobs", "output_top_logprobs")
        }
        return Delta(chunk["text"], ids, lps, tops, meta.get("finish_reason"))

    def final_dict(self, return_logprob: bool) -> dict[str, Any]:
        """The Engine's own result format (as `Engine.generate` returns it)."""
        meta = dict(self.meta)
        if return_logprob:
            meta["output_token_logprobs"] = list(self.logprobs)
            meta["output_top_logprobs"] = list(self.top_logprobs)
        return {
            "text": self.text,
            "output_ids": list(self.output_ids),
            "meta_info": meta,
            "index": self.index,
        }


async def collect(stream: ChunkStream, outputs: dict[str, Output]) -> None:
    """Read a stream to its end into `outputs` (by request id); the stream is closed either way."""
    try:
        async for chunk in stream:
            outputs[chunk["meta_info"]["id"]].add(chunk)
    finally:
        await stream.aclose()


async def collect_unless_disconnected(
    request: Request, stream: ChunkStream, outputs: dict[str, Output]
) -> bool:
    """`collect`, unless the client goes away first: then the request is aborted and this returns False
    (the handler answers 499)."""
    try:
        await unless_disconnected(request, collect(stream, outputs))
    except ClientDisconnected:
        return False
    return True


async def deltas(
    ctx: ServerContext, stream: ChunkStream, outputs: dict[str, Output]
) -> AsyncIterator[tuple[Output, Delta]]:
    """Each chunk added to its output, as (output, what it added); a failed request raises its APIError."""
    async for chunk in stream:
        out = outputs[chunk["meta_info"]["id"]]
        delta = out.add(chunk)
        ctx.check_failed(delta.finish_reason, len(out.output_ids))
        yield out, delta


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    # The body was read before the handler ran, so the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it (closing its stream aborts the request)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


def sse_event(payload: Any) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(exc: BaseException) -> bytes:
    """An error after the 200 and the first chunks were sent: it can only travel as an event."""
    if isinstance(exc, APIError):
        return sse_event(error_body(exc.status, exc.message, exc.param, exc.code))
    logger.exception("error while streaming", exc_info=exc)
    return sse_event(error_body(500, f"internal server error: {type(exc).__name__}: {exc}"))


async def sse_body(stream: ChunkStream, events: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """A streaming response's body: the handler's events, an error event if they raise, then [DONE]. The
    engine stream is closed however it ends, which aborts whatever is still running."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        yield sse_error(exc)
    finally:
        await events.aclose()
        await stream.aclose()
    yield SSE_DONE


class SSEResponse(StreamingResponse):
    """text/event-stream that always closes its iterator.

    Starlette stops iterating when the client goes away, but under an ASGI 2.4 server it does not close
    the generator, which would then hold the request (and its KV) until garbage collection.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


# ---- OpenAI formatting shared by /v1/completions and /v1/chat/completions ------------------------------
def openai_finish(reason: dict[str, Any] | None) -> tuple[str | None, int | str | None]:
    """The Engine's finish reason -> (OpenAI finish_reason, the stop string or token id that matched)."""
    if not reason:
        return None, None
    kind = reason.get("type")
    if kind == "stop":
        return "stop", reason.get("matched")
    if kind == "length":
        return "length", None
    return str(kind), None  # "abort", as vLLM reports it


def abort_message(reason: dict[str, Any] | None) -> str | None:
    """The engine's reason for an abort (OpenAI's finish_reason "abort" carries none), else None."""
    if not reason or reason.get("type") != "abort":
        return None
    return str(reason.get("message") or "aborted")


def usage_of(outputs: list[Output], n: int) -> Usage:
    """Prompt tokens count once per prompt (its first sample's), completion tokens once per output."""
    prompt = sum(o.meta.get("prompt_tokens", 0) for o in outputs[::n])
    cached = sum(o.meta.get("cached_tokens", 0) for o in outputs[::n])
    completion = sum(len(o.output_ids) for o in outputs)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def without_stop_token(delta: Delta, no_stop_trim: bool) -> Delta:
    """The delta's logprob entries without the stop token that ended the output (an EOS, <|im_end|>),
    whose text the message leaves out: logprobs list exactly the tokens of the text (unless no_stop_trim
    keeps it in the text too)."""
    reason = delta.finish_reason or {}
    matched = reason.get("matched") if reason.get("type") == "stop" else None
    if (
        no_stop_trim
        or not isinstance(matched, int)
        or not delta.token_ids
        or delta.token_ids[-1] != matched
    ):
        return delta
    return Delta(
        delta.text, delta.token_ids[:-1], delta.logprobs[:-1], delta.top_logprobs[:-1], delta.finish_reason
    )


def token_texts(engine: Any, delta: Delta) -> tuple[list[str], list[list[str]]]:
    """The text of each logprob entry's token and of its top alternatives, decoded in one batched call.

    Logprob entries show a token as the text it decodes to, as OpenAI does (not its BPE spelling)."""
    chosen = [int(tid) for tid in delta.token_ids]
    tops = [[int(t) for _, t, _ in entry] for entry in delta.top_logprobs]
    texts = engine.tokenizer_manager.token_texts(chosen + [t for row in tops for t in row])
    top_texts, at = [], len(chosen)
    for row in tops:
        top_texts.append(texts[at : at + len(row)])
        at += len(row)
    return texts[: len(chosen)], top_texts
