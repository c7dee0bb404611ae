"""Typed messages between the Engine front and the EngineCore.

Inline, they travel through a queue as objects; across processes they are msgpack-encoded (never pickle)
with `encode` / `decode`, which only know these dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack

from radixlm.engine.core import RequestOutput


@dataclass
class AddRequest:
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]
    return_logprob: bool = False
    top_logprobs_num: int = 0


@dataclass
class AbortRequest:
    rid: str
    message: str = "aborted by the client"


@dataclass
class ControlRequest:
    """A call that wants a reply: flush_cache, server_info, check, shutdown."""

    call_id: int
    method: str


@dataclass
class ControlReply:
    call_id: int
    ok: bool
    result: Any = None
    error: str | None = None


@dataclass
class StepOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)


@dataclass
class CoreReady:
    model_info: dict[str, Any]


@dataclass
class CoreFailed:
    error: str


MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (AddRequest, AbortRequest, ControlRequest, ControlReply, StepOutputs, CoreReady, CoreFailed)
}


def encode(msg: Any) -> bytes:
    if isinstance(msg, StepOutputs):
        body = {"outputs": [dataclasses.asdict(o) for o in msg.outputs]}
    else:
        body = dataclasses.asdict(msg)
    return msgpack.packb({"type": type(msg).__name__, "body": body}, use_bin_type=True)


def decode(data: bytes) -> Any:
    raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    cls = MESSAGE_TYPES.get(raw.get("type"))
    if cls is None:
        raise ValueError(f"unknown message type {raw.get('type')!r}")
    body = raw["body"]
    if cls is StepOutputs:
        return StepOutputs([RequestOutput(**o) for o in body["outputs"]])
    return cls(**body)
