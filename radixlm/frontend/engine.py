"""Engine: the offline Python API (sync, async and streaming) over an EngineCore.

    llm = Engine(model_path=..., model_impl="auto")
    llm.generate(["The capital of France is"], {"max_new_tokens": 20})   # list in, list of dicts out
    for chunk in llm.generate(prompt="Hi", sampling_params={...}, stream=True): ...
    await llm.async_generate(input_ids=[1, 2, 3], sampling_params={...})

The front runs a private asyncio loop on a thread for the sync calls; async calls run on the caller's loop.
Outputs arrive from the core thread and are handed to each request's own loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from radixlm.config import EngineConfig
from radixlm.frontend.tokenizer_manager import IncrementalDetokenizer, TokenizerManager
from radixlm.messages import (
    ABORT_CORE_DIED,
    ABORT_SHUTDOWN,
    FAILED_SHUTDOWN,
    AbortRequest,
    AddRequest,
    CheckInvariants,
    CoreFailed,
    FinishReason,
    FlushCache,
    GetServerInfo,
    RequestOutput,
    StepOutputs,
)
from radixlm.sampling_params import SamplingParams

logger = logging.getLogger("radixlm")

PROGRESS_BAR_MIN_REQUESTS = 8


@dataclass
class _Item:
    input_ids: list[int]
    params: SamplingParams
    index: int


@dataclass
class _RequestState:
    rid: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    detok: IncrementalDetokenizer
    prompt_tokens: int
    start: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[list[Any]] = field(default_factory=list)
    top_logprobs: list[list[list[Any]]] = field(default_factory=list)
    finished: bool = False
    last: RequestOutput | None = None


class Engine:
    def __init__(
        self, model_path: str = "", model_impl: str = "auto", dtype: str = "auto", **options: Any
    ) -> None:
        self.config = EngineConfig.from_options(
            model_path=model_path, model_impl=model_impl, dtype=dtype, **options
        )
        _setup_logging(self.config.log_level)
        self._states: dict[str, _RequestState] = {}
        self._client = self._make_client()
        self.model_info = self._client.model_info
        tok_path = self.config.tokenizer_path or self.model_info["model_path"]
        try:
            self.tokenizer_manager = TokenizerManager(
                tok_path,
                chat_template=self.config.chat_template,
                trust_remote_code=self.config.trust_remote_code,
            )
        except Exception:
            self._client.shutdown()  # do not leave a core running for an Engine that never existed
            raise
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="radixlm-engine-loop", daemon=True
        )
        self._loop_thread.start()
        self._closed = False
        logger.info(
            "radixlm engine ready: %s (%s, %s) on %s",
            self.model_info["architecture"],
            self.model_info["model_impl"],
            self.model_info["dtype"],
            self.model_info["device"],
        )

    def _make_client(self):
        if self.config.inline_core:
            from radixlm.frontend.core_client import InlineCoreClient

            return InlineCoreClient(self.config, self._on_core_message)
        from radixlm.frontend.core_process import ProcessCoreClient

        return ProcessCoreClient(self.config, self._on_core_message)

    def is_alive(self) -> bool:
        """False once shut down, or once the core process exited (killed, crashed) on its own."""
        return not self._closed and self._client.is_alive()

    @property
    def core_pid(self) -> int | None:
        """The core process's pid (kept after it exits); None when the core runs inline."""
        return getattr(self._client, "pid", None)

    # ---- public API ----------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | SamplingParams | list | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """A single prompt returns a dict, a list returns a list; stream=True returns an iterator of dicts."""
        self._check_alive()  # before touching the private loop, which is closed after shutdown()
        coro = self.async_generate(
            prompt, sampling_params, input_ids, stream, return_logprob, top_logprobs_num, rid
        )
        result = asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        if stream:
            return self._iterate_sync(result)
        return result

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | SamplingParams | list | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        rid: str | list[str] | None = None,
    ) -> Any:
        """`rid` names the requests (meta_info["id"]) so that `abort_request(rid)` can target them: a string
        when there is one request, else a list with one id per prompt and sample (prompt-major: with n=2,
        [p0 s0, p0 s1, p1 s0, ...]). None: fresh random ids."""
        self._check_alive()
        items, single = self._normalize(prompt, input_ids, sampling_params)
        _check_logprob_args(return_logprob, top_logprobs_num)
        if rid is None:
            rids = [uuid.uuid4().hex for _ in items]
        else:
            rids = [rid] if isinstance(rid, str) else rid
            if (
                not isinstance(rids, list)
                or len(rids) != len(items)
                or not all(isinstance(r, str) and r for r in rids)
            ):
                raise ValueError(
                    f"rid must be a non-empty string for one request, or a list of {len(items)} "
                    f"non-empty strings (one per prompt and sample), got {rid!r}"
                )
            if len(set(rids)) != len(rids):
                raise ValueError(f"rid holds the same id more than once: {rids}")
            taken = [r for r in rids if r in self._states]
            if taken:
                raise ValueError(f"request id(s) {taken} are already in use")
        gens = [self._run_one(it, return_logprob, top_logprobs_num, stream, r) for it, r in zip(items, rids)]
        if stream:
            return gens[0] if len(gens) == 1 else _merge_streams(gens)
        with tqdm(total=len(gens), desc="generate", disable=len(gens) < PROGRESS_BAR_MIN_REQUESTS) as bar:

            async def collect(gen):
                result = [x async for x in gen][-1]
                bar.update(1)
                return result

            results = await asyncio.gather(*(collect(g) for g in gens))
        return results[0] if single and len(results) == 1 else list(results)

    def get_model_info(self) -> dict[str, Any]:
        return {
            **self.model_info,
            "tokenizer_path": self.config.tokenizer_path or self.model_info["model_path"],
        }

    def get_server_info(self) -> dict[str, Any]:
        self._check_alive()
        reply = self._client.call(GetServerInfo)
        if not reply.ok:
            raise RuntimeError(reply.error)
        return {
            **reply.result,
            "core_pid": self.core_pid,
            "config": {k: v for k, v in vars(self.config).items()},
        }

    def flush_cache(self) -> dict[str, Any]:
        reply = self._client.call(FlushCache)
        return {"success": reply.ok, "message": reply.result if reply.ok else (reply.error or reply.result)}

    def check(self) -> None:
        """Assert the KV accounting invariant (DESIGN.md invariant 2); for tests."""
        reply = self._client.call(CheckInvariants)
        if not reply.ok:
            raise AssertionError(reply.error)

    def abort_request(self, rid: str) -> None:
        self._client.send(AbortRequest(rid))

    def shutdown(self) -> None:
        """Stop the core (and its process), then the front's loop. Idempotent; safe in a signal handler."""
        if self._closed:
            return
        self._closed = True
        self._client.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._loop_thread:  # a thread cannot join itself
            self._loop_thread.join(timeout=10)
            if not self._loop_thread.is_alive():
                # A sync call after shutdown then fails at once ("Event loop is closed") instead of
                # waiting forever on a loop that no longer runs.
                self._loop.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- inputs ----------------------------------------------------------------------------------
    def _normalize(self, prompt, input_ids, sampling_params) -> tuple[list[_Item], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt or input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else prompt
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt must be a string or a list of strings")
            ids_list = [self.tokenizer_manager.encode(p) for p in prompts]
        else:
            single = bool(input_ids) and all(isinstance(t, int) for t in input_ids)
            ids_list = [input_ids] if single else input_ids
            if not isinstance(ids_list, list) or not all(isinstance(x, list) for x in ids_list):
                raise ValueError("input_ids must be a list of token ids or a list of such lists")
        if not ids_list:
            raise ValueError("no prompts given")
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(ids_list):
                raise ValueError(
                    f"sampling_params has {len(sampling_params)} entries for {len(ids_list)} prompts"
                )
            params = [SamplingParams.from_any(p) for p in sampling_params]
        else:
            params = [SamplingParams.from_any(sampling_params)] * len(ids_list)
        for ids in ids_list:
            self._validate_ids(ids)
        items = []
        for i, (ids, p) in enumerate(zip(ids_list, params)):
            for k in range(p.n):
                # n samples of one prompt draw from distinct but reproducible streams
                pk = (
                    p
                    if p.n == 1
                    else SamplingParams.from_any(
                        {**p.to_dict(), "n": 1, "seed": None if p.seed is None else p.seed + k}
                    )
                )
                items.append(_Item(list(ids), pk, i))
        return items, single and params[0].n == 1

    def _validate_ids(self, ids: list[int]) -> None:
        vocab, ctx = self.model_info["vocab_size"], self.model_info["context_length"]
        if not ids:
            raise ValueError("the prompt is empty: it must hold at least one token")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"input_ids holds {t!r}, outside the vocabulary [0, {vocab})")
        if len(ids) >= ctx:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the context length is {ctx}, leaving no room for output"
            )

    # ---- one request ---------------------------------------------------------------------------
    async def _run_one(
        self, item: _Item, return_logprob: bool, top_n: int, stream: bool, rid: str | None = None
    ) -> AsyncIterator[dict]:
        rid = rid or uuid.uuid4().hex
        if rid in self._states:  # checked again here: two calls may race between async_generate and now
            raise ValueError(f"request id {rid!r} is already in use")
        state = _RequestState(
            rid,
            asyncio.get_running_loop(),
            asyncio.Queue(),
            self.tokenizer_manager.detokenizer(item.params),
            len(item.input_ids),
        )
        self._states[rid] = state
        self._client.send(AddRequest([rid], item.input_ids, item.params.to_dict(), return_logprob, top_n))
        try:
            while not state.finished:
                out = await state.queue.get()
                new_ids = self._apply(state, out)
                if stream:
                    yield self._chunk(state, new_ids, return_logprob, item.index)
            if not stream:
                yield self._final(state, return_logprob, item.index)
        finally:
            if not state.finished:  # the caller went away (cancelled, disconnected): free its KV now
                self._client.send(AbortRequest(rid))
            self._states.pop(rid, None)

    def _apply(self, state: _RequestState, out: RequestOutput) -> list[int]:
        state.last = out
        state.output_ids.extend(out.new_token_ids)
        state.detok.add(out.new_token_ids)
        for i, tid in enumerate(out.new_token_ids):
            if i < len(out.new_logprobs):
                state.logprobs.append([out.new_logprobs[i], tid, None])
            if i < len(out.new_top_logprobs):
                state.top_logprobs.append([[lp, t, None] for t, lp in out.new_top_logprobs[i]])
        state.finished = out.finished
        return out.new_token_ids

    def _meta(self, state: _RequestState, return_logprob: bool) -> dict[str, Any]:
        out = state.last
        meta = {
            "id": state.rid,
            "prompt_tokens": state.prompt_tokens,
            "completion_tokens": len(state.output_ids),
            "cached_tokens": out.cached_tokens if out else 0,
            "finish_reason": out.finish_reason.to_dict() if out and out.finish_reason else None,
            "e2e_latency": time.perf_counter() - state.start,
        }
        if return_logprob:
            meta["output_token_logprobs"] = state.logprobs
            meta["output_top_logprobs"] = state.top_logprobs
        return meta

    def _final(self, state: _RequestState, return_logprob: bool, index: int) -> dict[str, Any]:
        text = state.detok.final_text(_reason_dict(state.last))
        return {
            "text": text,
            "output_ids": list(state.output_ids),
            "meta_info": self._meta(state, return_logprob),
            "index": index,
        }

    def _chunk(
        self, state: _RequestState, new_ids: list[int], return_logprob: bool, index: int
    ) -> dict[str, Any]:
        delta = state.detok.take_delta(state.finished, _reason_dict(state.last))
        return {
            "text": delta,
            "output_ids": list(new_ids),
            "meta_info": self._meta(state, return_logprob),
            "index": index,
        }

    def _on_core_message(self, msg: Any) -> None:
        """Runs on the core's thread: route each output to the loop that waits for it."""
        if isinstance(msg, StepOutputs):
            for out in msg.outputs:
                state = self._states.get(out.rid)
                if state is not None:
                    state.loop.call_soon_threadsafe(state.queue.put_nowait, out)
        elif isinstance(msg, CoreFailed):
            for state in list(self._states.values()):
                if msg.kind == FAILED_SHUTDOWN:
                    reason = FinishReason.abort(ABORT_SHUTDOWN, msg.message)
                else:
                    reason = FinishReason.abort(ABORT_CORE_DIED, f"engine core died: {msg.message}")
                failed = RequestOutput(
                    state.rid, [], reason, state.prompt_tokens, len(state.output_ids), 0
                )
                state.loop.call_soon_threadsafe(state.queue.put_nowait, failed)

    def _check_alive(self) -> None:
        if self._closed:
            raise RuntimeError("this Engine was shut down")
        if not self._client.is_alive():
            reason = self._client.dead_reason or "its process exited"
            raise RuntimeError(f"the engine core is not running: {reason}")

    def _iterate_sync(self, agen: AsyncIterator[dict]) -> Iterator[dict]:
        try:
            while True:
                try:
                    yield asyncio.run_coroutine_threadsafe(agen.__anext__(), self._loop).result()
                except StopAsyncIteration:
                    return
        finally:
            asyncio.run_coroutine_threadsafe(agen.aclose(), self._loop).result()


def _reason_dict(out: RequestOutput | None) -> dict[str, Any] | None:
    return out.finish_reason.to_dict() if out is not None and out.finish_reason is not None else None


async def _merge_streams(gens: list[AsyncIterator[dict]]) -> AsyncIterator[dict]:
    """Interleave several streams as chunks arrive; each chunk carries its prompt's `index`."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(gen):
        try:
            async for chunk in gen:
                await queue.put(chunk)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def _check_logprob_args(return_logprob: Any, top_logprobs_num: Any) -> None:
    if not isinstance(return_logprob, bool):
        raise ValueError(f"return_logprob must be a bool, got {return_logprob!r}")
    if (
        isinstance(top_logprobs_num, bool)
        or not isinstance(top_logprobs_num, int)
        or not 0 <= top_logprobs_num <= 20
    ):
        raise ValueError(f"top_logprobs_num must be an integer in [0, 20], got {top_logprobs_num!r}")


def _setup_logging(level: str) -> None:
    root = logging.getLogger("radixlm")
    root.setLevel(level.upper())
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[radixlm %(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
