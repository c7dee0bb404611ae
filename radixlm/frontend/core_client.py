"""How the Engine front reaches its EngineCore: messages in, outputs and replies back through a callback.

`InlineCoreClient` runs the core loop on a thread of this process; `ProcessCoreClient`
(radixlm/frontend/core_process.py), the default, runs it in a child process and speaks the same messages
(radixlm/messages.py) over ZMQ sockets, so the Engine does not care which one it has.

`on_message` runs on the client's own thread (the inline core's thread, or the process client's reader):
the Engine detokenizes there, off every event loop. The core's code is imported only when an inline core
is started, so importing the front loads no model code.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from radixlm.config import EngineConfig
from radixlm.messages import (
    ABORT_CORE_DIED,
    FAILED_RUNTIME,
    FAILED_SHUTDOWN,
    AddRequest,
    ControlCall,
    ControlReply,
    CoreFailed,
    FinishReason,
    RequestOutput,
    Shutdown,
    StepOutputs,
)

logger = logging.getLogger(__name__)


class CoreClientBase:
    """Control calls with replies (futures keyed by call id); everything else goes to `on_message`."""

    def __init__(self, on_message: Callable[[Any], None]) -> None:
        self._on_message = on_message
        self._call_ids = itertools.count()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.dead_reason: str | None = None
        self.model_info: dict[str, Any] = {}

    def send(self, msg: Any) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def is_alive(self) -> bool:
        return self.dead_reason is None

    def call(self, call_type: type[ControlCall], timeout: float | None = 60.0) -> ControlReply:
        fut: Future = Future()
        # Check and register under the lock that `_mark_dead` takes: a core that dies between the two
        # would otherwise leave this future unanswered until its timeout.
        with self._lock:
            if self.dead_reason is not None:
                raise RuntimeError(f"the engine core is not running: {self.dead_reason}")
            call_id = next(self._call_ids)
            self._pending[call_id] = fut
        self.send(call_type(call_id))
        return fut.result(timeout=timeout)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, ControlReply):
            with self._lock:
                fut = self._pending.pop(msg.call_id, None)
            if fut is not None:
                fut.set_result(msg)
            return
        if isinstance(msg, CoreFailed):
            if not self._mark_dead(msg.message):
                return  # already reported: the Engine has failed every request once
        self._on_message(msg)

    def _mark_dead(self, reason: str) -> bool:
        """Record the first reason and answer every pending call; False if already dead."""
        with self._lock:
            if self.dead_reason is not None:
                return False
            self.dead_reason = reason
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_result(ControlReply(-1, False, error=f"the engine core died: {reason}"))
        return True

    def _fail_unsent(self, msg: Any) -> None:
        """A message that cannot reach a dead core: an AddRequest gets its abort here, so no caller waits.

        Needed for the request that registers just after the CoreFailed fan-out went through the Engine.
        """
        if isinstance(msg, AddRequest):
            reason = FinishReason.abort(ABORT_CORE_DIED, f"engine core died: {self.dead_reason}")
            outs = [RequestOutput(rid, [], reason, len(msg.input_ids), 0, 0) for rid in msg.rids]
            self._on_message(StepOutputs(outs))


class InlineCoreClient(CoreClientBase):
    """The core on a thread of this process. The thread also builds it (loads the weights, measures the
    kernels): libgomp keeps one thread pool per thread that has run a parallel region, and once there are
    more pool threads than cores it spins only briefly before sleeping, so every parallel region of a step
    then pays a futex wake-up (2-core Zen 4, bf16 decode attention at 33 tokens: 9-10 us a call from a
    thread that alone runs torch, 82-100 us once the main thread had a pool too; 0.5B batch-1 decode
    ~19-20 tok/s inline against ~22-23 in the core process). A caller whose own thread has run torch's
    parallel ops still has its pool: the core process avoids that too."""

    def __init__(self, config: EngineConfig, on_message: Callable[[Any], None]) -> None:
        super().__init__(on_message)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._built: queue.SimpleQueue = queue.SimpleQueue()  # the core, or the exception that stopped it
        from radixlm.core.malloc_tuning import keep_freed_memory, runs_on_cpu, share_main_arena

        if runs_on_cpu(config.device):
            # Before the thread exists: its step buffers must come from the main arena (malloc_tuning).
            keep_freed_memory()
            share_main_arena()
        self._thread = threading.Thread(target=self._run, args=(config,), name="radixlm-core", daemon=True)
        self._thread.start()
        built = self._built.get()
        if isinstance(built, BaseException):
            self._thread.join()
            raise built
        self.core = built
        self.model_info = self.core.model_info().as_dict()

    def send(self, msg: Any) -> None:
        if self.dead_reason is not None:
            self._fail_unsent(msg)
            return
        self._inbox.put(msg)

    def _receive(self, block: bool) -> list[Any]:
        msgs = []
        if block:
            msgs.append(self._inbox.get())
        while True:
            try:
                msgs.append(self._inbox.get_nowait())
            except queue.Empty:
                return msgs

    def _run(self, config: EngineConfig) -> None:
        from radixlm.core.core_loop import run_core_loop
        from radixlm.core.engine_core import EngineCore

        try:
            core = EngineCore(config)
        except BaseException as exc:  # raised again by __init__, in the caller's thread
            self._built.put(exc)
            return
        self._built.put(core)
        try:
            run_core_loop(core, self._receive, self._dispatch)
        except Exception as exc:  # a bug in the core: fail every waiter loudly rather than hang them
            logger.error("engine core crashed:\n%s", traceback.format_exc())
            self._dispatch(CoreFailed(FAILED_RUNTIME, f"{type(exc).__name__}: {exc}"))
        finally:
            core.close()  # the other tensor-parallel ranks, if any

    def shutdown(self) -> None:
        if self.dead_reason is None and self._thread.is_alive():
            self.call(Shutdown)
        self._thread.join(timeout=30)
        # Requests still in flight get an abort now (as with the process client) instead of waiting
        # forever on a core that is gone.
        self._dispatch(CoreFailed(FAILED_SHUTDOWN, "the engine was shut down"))
