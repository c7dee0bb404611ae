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
            reply = _apply(core, msg)
            if reply is not None:
                send(reply)
        if core.has_work():
            outputs = core.step()
            if outputs:
                send(StepOutputs(outputs))


def _apply(core: EngineCore, msg: Any) -> Any:
    if isinstance(msg, AddRequest):
        try:
            core.add_request(msg)
        except (ValueError, TypeError) as exc:  # the front validates; this is the core's own safety net
            reason = FinishReason.abort(ABORT_REFUSED, str(exc))
            return StepOutputs([RequestOutput(rid, [], reason, len(msg.input_ids), 0, 0) for rid in msg.rids])
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
