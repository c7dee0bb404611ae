"""The EngineCore's event loop, shared by the inline thread and the core process.

wait for messages (block only when idle) -> apply them -> one step -> send its outputs
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

from radixlm.core.engine_core import EngineCore
from radixlm.messages import (
    ABORT_REFUSED,
    AbortRequest,
    AddRequest,
    CheckInvariants,
    ControlCall,
    ControlReply,
    FinishReason,
    FlushCache,
    GetServerInfo,
    RequestOutput,
    Shutdown,
    StepOutputs,
)

logger = logging.getLogger(__name__)


def run_core_loop(
    core: EngineCore,
    receive: Callable[[bool], list[Any]],
    send: Callable[[Any], None],
) -> None:
    """Runs until a Shutdown call arrives. `receive(block)` returns pending messages."""
    while True:
        for msg in receive(not core.has_work()):
            if isinstance(msg, Shutdown):
                send(ControlReply(msg.call_id, True))
                return
            reply = _apply_guarded(core, msg)
            if reply is not None:
                send(reply)
        if core.has_work():
            outputs = core.step()
            if outputs:
                send(StepOutputs(outputs))


def _apply_guarded(core: EngineCore, msg: Any) -> Any:
    """`_apply`, but a message whose fields are malformed (it decoded, yet is not what its class says) is
    dropped and logged: one bad message must not stop the engine for every other request."""
    try:
        return _apply(core, msg)
    except Exception as exc:
        logger.error("core: dropping a message it could not apply: %.200r\n%s", msg, traceback.format_exc())
        if isinstance(msg, AddRequest):  # its caller waits: answer with a refusal rather than silence
            return _refused(msg, f"{type(exc).__name__}: {exc}")
        return None


def _refused(msg: AddRequest, message: str) -> StepOutputs | None:
    rids = msg.rids if isinstance(msg.rids, list) else []
    prompt_len = len(msg.input_ids) if isinstance(msg.input_ids, list) else 0
    reason = FinishReason.abort(ABORT_REFUSED, message)
    outputs = [RequestOutput(rid, [], reason, prompt_len, 0, 0) for rid in rids if isinstance(rid, str)]
    return StepOutputs(outputs) if outputs else None


def _apply(core: EngineCore, msg: Any) -> Any:
    if isinstance(msg, AddRequest):
        try:
            core.add_request(msg)
        except (ValueError, TypeError) as exc:  # the front validates; this is the core's own safety net
            return _refused(msg, str(exc))
        return None
    if isinstance(msg, AbortRequest):
        out = core.abort(msg.rid, msg.message)
        return StepOutputs([out]) if out is not None else None
    if isinstance(msg, ControlCall):
        return _control(core, msg)
    logger.error("core: ignoring unknown message %r", msg)
    return None


def _control(core: EngineCore, msg: ControlCall) -> ControlReply:
    try:
        if isinstance(msg, FlushCache):
            ok, text = core.flush_cache()
            return ControlReply(msg.call_id, ok, text)
        if isinstance(msg, GetServerInfo):
            return ControlReply(msg.call_id, True, core.server_info())
        if isinstance(msg, CheckInvariants):
            core.check()
            return ControlReply(msg.call_id, True)
        return ControlReply(msg.call_id, False, error=f"unknown control call {type(msg).__name__}")
    except Exception as exc:  # report, do not kill the core
        return ControlReply(
            msg.call_id, False, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        )
