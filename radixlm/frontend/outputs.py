"""Core outputs -> the dicts a caller gets: per-request state, batched detokenization, stream fan-out.

    core client thread (the process client's reader, or the inline core's thread)
      OutputProcessor.process(one step's RequestOutputs)
        apply each to its RequestState (ids, logprobs, finish)
        requests due a chunk: finished ones, and streams with `stream_interval` new tokens
        one BatchDetokenizer.step for all of them          (text never decoded on an event loop)
        one call_soon_threadsafe per event loop, carrying that loop's Updates
    event loop
      a call's queue (one per generate call, shared by its prompts and samples: that is the merge)
        -> CallOutputs.to_dict(update) -> {"text", "output_ids", "meta_info", "index"}

`stream_interval` (SGLang's): a streaming request gets a chunk every that many new tokens, and always at
its finish; a non-streaming one only its final dict. A RequestState is touched only by the thread that
processes outputs (under the processor's lock); the loop sees immutable Updates.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from radixlm.frontend.tokenizer_manager import BatchDetokenizer, DetokState
from radixlm.messages import (
    ABORT_CORE_DIED,
    ABORT_SHUTDOWN,
    FAILED_SHUTDOWN,
    CoreFailed,
    FinishReason,
    RequestOutput,
)

logger = logging.getLogger("radixlm")


@dataclass(eq=False)
class CallSink:
    """Where one generate call's updates go: its event loop and one queue for all its requests."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass(frozen=True)
class Update:
    """What one request shows its caller at once: a stream chunk, or a final result."""

    rid: str
    index: int
    text: str  # the text delta (a stream), or the whole text (a non-streaming final)
    output_ids: list[int]  # the ids since the previous update (a non-streaming final: all of them)
    logprobs: list[list[Any]]  # [logprob, token_id, None] per id of output_ids
    top_logprobs: list[list[list[Any]]]  # per id, [[logprob, token_id, None], ...]
    meta: dict[str, Any]  # meta_info without the logprob lists
    finished: bool
    # Prompt logprobs since the previous update, [logprob, token_id, None] per prompt position (SGLang's
    # input_token_logprobs; position 0 has logprob None), and their top alternatives (None at position 0).
    input_logprobs: list[list[Any]] = field(default_factory=list)
    input_top_logprobs: list[list[list[Any]] | None] = field(default_factory=list)
    embedding: list[float] | None = None  # an encode request's vector, with its final update


@dataclass(eq=False)
class RequestState:
    rid: str
    index: int
    stream: bool
    sink: CallSink
    detok: DetokState
    prompt_tokens: int
    start: float = field(default_factory=time.perf_counter)
    finished: bool = False
    last: RequestOutput | None = None
    # Since the previous update:
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[list[Any]] = field(default_factory=list)
    pending_top: list[list[list[Any]]] = field(default_factory=list)
    # Prompt logprobs (logprob_start_len >= 0): the prompt names each entry's token.
    input_ids: list[int] = field(default_factory=list)
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    pending_input: list[list[Any]] = field(default_factory=list)
    pending_input_top: list[list[list[Any]] | None] = field(default_factory=list)
    _next_input: int = 0  # the prompt position of the next prompt logprob the core sends
    embedding: list[float] | None = None  # an encode request's result (RequestOutput.embedding)

    def __post_init__(self) -> None:
        k = self.logprob_start_len
        if k == 0:  # the first token has nothing before it: SGLang reports it with a None logprob
            self.pending_input.append([None, self.input_ids[0], None])
            if self.top_logprobs_num:
                self.pending_input_top.append(None)
        self._next_input = max(k, 1)

    @property
    def output_ids(self) -> list[int]:
        return self.detok.ids

    def apply(self, out: RequestOutput) -> None:
        self.last = out
        ids = out.new_token_ids
        self.detok.ids.extend(ids)
        self.pending_ids.extend(ids)
        for i, tid in enumerate(ids):
            if i < len(out.new_logprobs):
                self.pending_logprobs.append([out.new_logprobs[i], tid, None])
            if i < len(out.new_top_logprobs):
                self.pending_top.append([[lp, t, None] for t, lp in out.new_top_logprobs[i]])
        for i, lp in enumerate(out.new_input_logprobs):
            self.pending_input.append([lp, self.input_ids[self._next_input], None])
            self._next_input += 1
            if i < len(out.new_input_top_logprobs):
                self.pending_input_top.append([[v, t, None] for t, v in out.new_input_top_logprobs[i]])
        self.finished = out.finished
        if out.embedding is not None:
            self.embedding = out.embedding

    def reason(self) -> dict[str, Any] | None:
        out = self.last
        return out.finish_reason.to_dict() if out is not None and out.finish_reason is not None else None

    def take_update(self, text: str) -> Update:
        out = self.last
        meta = {
            "id": self.rid,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.detok.ids),
            "cached_tokens": out.cached_tokens if out else 0,
            "finish_reason": self.reason(),
            "e2e_latency": time.perf_counter() - self.start,
        }
        update = Update(
            self.rid,
            self.index,
            text,
            self.pending_ids,
            self.pending_logprobs,
            self.pending_top,
            meta,
            self.finished,
            self.pending_input,
            self.pending_input_top,
            self.embedding if self.finished else None,
        )
        self.pending_ids, self.pending_logprobs, self.pending_top = [], [], []
        self.pending_input, self.pending_input_top = [], []
        return update


class OutputProcessor:
    """The registry of running requests and the step-output path (called on the core client's thread)."""

    def __init__(self, detokenizer: BatchDetokenizer, stream_interval: int = 1) -> None:
        self.detokenizer = detokenizer
        self.stream_interval = stream_interval
        self._states: dict[str, RequestState] = {}
        # Serializes output processing: normally only the core client's thread runs it, but a failure
        # fan-out (shutdown, an AddRequest sent to a dead core) can come from another thread.
        self._lock = threading.Lock()

    # Registration runs on event loops: plain dict operations, never waiting on the lock (which is held
    # while a step is detokenized).
    def register(self, states: Iterable[RequestState]) -> None:
        for st in states:
            self._states[st.rid] = st

    def unregister(self, rids: Iterable[str]) -> None:
        for rid in rids:
            self._states.pop(rid, None)

    def in_use(self, rid: str) -> bool:
        return rid in self._states

    def process(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            due: dict[str, RequestState] = {}  # by rid: a request gets at most one update per call
            for out in outputs:
                st = self._states.get(out.rid)
                if st is None or st.finished:
                    continue
                st.apply(out)
                if st.finished or (st.stream and len(st.pending_ids) >= self.stream_interval):
                    due[st.rid] = st
            if not due:
                return
            running = [st for st in due.values() if not st.finished]
            finished = [st for st in due.values() if st.finished]
            running_text, finished_text = self.detokenizer.step(
                [st.detok for st in running], [(st.detok, st.reason()) for st in finished]
            )
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Update]]] = {}
            for st, text in zip(running, running_text):
                by_loop.setdefault(st.sink.loop, []).append((st.sink.queue, st.take_update(text)))
            # A stream's last chunk completes the text it has shown; a non-stream showed nothing before,
            # so its delta is the whole text.
            for st, text in zip(finished, finished_text):
                by_loop.setdefault(st.sink.loop, []).append((st.sink.queue, st.take_update(text)))
        for loop, items in by_loop.items():
            # One wake-up per loop per step, however many of its requests got something.
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is left to read these
                logger.debug("dropping %d outputs for a closed event loop", len(items))

    def fail_all(self, failed: CoreFailed) -> None:
        """The core is gone: every request still running ends with an abort (503 over HTTP)."""
        if failed.kind == FAILED_SHUTDOWN:
            reason = FinishReason.abort(ABORT_SHUTDOWN, failed.message)
        else:
            reason = FinishReason.abort(ABORT_CORE_DIED, f"engine core died: {failed.message}")
        outs = [
            RequestOutput(st.rid, [], reason, st.prompt_tokens, len(st.output_ids), 0)
            for st in list(self._states.values())
            if not st.finished
        ]
        self.process(outs)


def _deliver(items: list[tuple[asyncio.Queue, Update]]) -> None:
    for queue, update in items:
        queue.put_nowait(update)


class CallOutputs:
    """The loop side of one call: Updates -> the Engine's dicts. With logprobs, `meta_info` carries each
    request's cumulative lists (they grow on this loop only, as its updates are read)."""

    def __init__(self, return_logprob: bool) -> None:
        self.return_logprob = return_logprob
        self._logprobs: dict[str, tuple[list, list, list, list]] = {}

    def to_dict(self, u: Update) -> dict[str, Any]:
        meta = u.meta
        if self.return_logprob:
            lps, tops, in_lps, in_tops = self._logprobs.setdefault(u.rid, ([], [], [], []))
            lps.extend(u.logprobs)
            tops.extend(u.top_logprobs)
            in_lps.extend(u.input_logprobs)
            in_tops.extend(u.input_top_logprobs)
            meta = {
                **meta,
                "output_token_logprobs": lps,
                "output_top_logprobs": tops,
                "input_token_logprobs": in_lps,
                "input_top_logprobs": in_tops,
            }
        if u.embedding is not None:
            return {"embedding": u.embedding, "meta_info": meta, "index": u.index}
        return {"text": u.text, "output_ids": u.output_ids, "meta_info": meta, "index": u.index}
