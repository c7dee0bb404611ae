"""Every message that crosses between the front (Engine, server) and the engine core, and their codec.

A leaf module: it imports neither torch nor any other part of radixlm, so the HTTP server and the front can
import it without loading the core. Inline, messages travel through a queue as objects; across processes
they are msgpack-encoded by `encode` / `decode`, which know only the classes registered below (never
pickle).

Control calls are one class each (FlushCache, GetServerInfo, CheckInvariants, Shutdown), each carrying
the `call_id` its ControlReply answers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

# ---- why a request finished ----------------------------------------------------------------------

# Who ended a request that did not stop or reach its length: the server maps these to HTTP statuses
# without reading the message text.
ABORT_CLIENT = "client"  # the caller asked (abort_request, a disconnect, a cancelled task)
ABORT_REFUSED = "refused"  # the core cannot serve it (e.g. more KV than the pool holds): a 400
ABORT_CORE_DIED = "core_died"  # the core process exited or crashed: a 503
ABORT_SHUTDOWN = "shutdown"  # the engine was shut down while the request ran: a 503
ABORT_KINDS = (ABORT_CLIENT, ABORT_REFUSED, ABORT_CORE_DIED, ABORT_SHUTDOWN)
# The HTTP status an abort answers with (SGLang puts it in the abort's finish_reason as "status_code").
# A client's own abort has none: nobody is left to answer.
ABORT_STATUS = {ABORT_REFUSED: 400, ABORT_CORE_DIED: 503, ABORT_SHUTDOWN: 503}

CLIENT_ABORT_MESSAGE = "aborted by the client"


@dataclass(frozen=True)
class FinishReason:
    """`type` is "stop" (a stop token or string: `matched`), "length" (`length` tokens) or "abort"
    (`abort_kind` says who, `message` why)."""

    type: str
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None
    abort_kind: str | None = None

    @classmethod
    def stop(cls, matched: int | str) -> FinishReason:
        return cls("stop", matched=matched)

    @classmethod
    def of_length(cls, length: int) -> FinishReason:
        return cls("length", length=length)

    @classmethod
    def abort(cls, kind: str, message: str) -> FinishReason:
        if kind not in ABORT_KINDS:
            raise ValueError(f"abort kind must be one of {ABORT_KINDS}, got {kind!r}")
        return cls("abort", message=message, abort_kind=kind)

    @property
    def is_abort(self) -> bool:
        return self.type == "abort"

    def to_dict(self) -> dict[str, Any]:
        """SGLang's `meta_info.finish_reason` shape."""
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.type == "length":
            return {"type": "length", "length": self.length}
        out: dict[str, Any] = {"type": "abort", "message": self.message}
        status = ABORT_STATUS.get(self.abort_kind or "")
        if status is not None:
            out["status_code"] = status
        return out


# ---- front -> core -------------------------------------------------------------------------------
@dataclass
class AddRequest:
    """One prompt and its n samples. `rids` names each sample (len(rids) == n): the core computes the
    prompt once for all of them, seeds sample k with seed + k (when a seed is set) and reports each sample
    under its own rid. `sampling_params` is a validated SamplingParams as a dict; the core takes the
    number of samples from `rids`, not from its `n`. `logprob_start_len` k >= 0 (with return_logprob)
    asks for prompt logprobs of positions k..len-1 (SGLang's); -1 for none."""

    rids: list[str]
    input_ids: list[int]
    sampling_params: dict[str, Any]
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    # Encode (pooling models): the prompt's hidden states are pooled into RequestOutput.embedding; nothing
    # is sampled (sampling_params has max_new_tokens 0) and the request finishes after its prompt.
    pooling: bool = False
    # Images of a vision-language prompt (frontend/multimodal.py makes them), in prompt order, each a map:
    # offset / length (its placeholder tokens in input_ids), hash (a 63-bit int of its pixels: the prefix
    # cache keys its positions by it), tensors ({name: [dtype, shape, raw bytes]}: what the model's
    # processor made for this image). The core adds "bidirectional" from the model (Gemma 3's images).
    images: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AbortRequest:
    rid: str
    message: str = CLIENT_ABORT_MESSAGE


@dataclass
class ControlCall:
    """A call that wants a ControlReply with the same call_id."""

    call_id: int


@dataclass
class FlushCache(ControlCall):
    pass


@dataclass
class GetServerInfo(ControlCall):
    pass


@dataclass
class CheckInvariants(ControlCall):
    pass


@dataclass
class Shutdown(ControlCall):
    pass


# ---- core -> front -------------------------------------------------------------------------------
@dataclass
class ControlReply:
    call_id: int
    ok: bool
    result: Any = None
    error: str | None = None


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: only the new tokens; the front accumulates.

    `new_input_logprobs` are prompt-token logprobs (logprob_start_len), in prompt order, continuing where
    the previous output's ended: the first ever is prompt position max(logprob_start_len, 1) (position
    0 has no logprob; the front shows it as None)."""

    rid: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    new_logprobs: list[float] = field(default_factory=list)
    new_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    new_input_logprobs: list[float] = field(default_factory=list)
    new_input_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # A pooling request's result, with its final output: the embedding (or a classifier's logits).
    embedding: list[float] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)


@dataclass
class ModelInfo:
    """What the front needs to know about the loaded model and the resolved runtime, sent once at start."""

    model_path: str
    architecture: str
    model_impl: str
    model_impl_reason: str
    dtype: str
    device: str
    context_length: int
    vocab_size: int
    kv_capacity: int
    max_running_requests: int
    eos_token_ids: list[int] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)  # the resolved RuntimeConfig
    quantization: str = "none"  # the weight quantization method that runs (EngineConfig.quantization)
    weight_bytes: int = 0  # bytes of this rank's weights as held (quantized weights and their scales)
    checkpoint_format: str = ""  # safetensors, pt or gguf (with the GGUF tensor types, dequantized at load)
    # What the model is for (model/heads.py): "generate", "embed" or "classify"; a pooling model's pooling
    # ("last, normalized: ..."), and a classifier's labels in class order (config.id2label).
    task: str = "generate"
    pooling: str = ""
    labels: list[str] = field(default_factory=list)
    multimodal: bool = False  # the model takes images (a vision-language model through transformers)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CoreReady:
    model_info: ModelInfo


# Kinds of CoreFailed: the front raises the matching exception again, so a bad model path is the same
# error inline and across processes.
FAILED_MODEL_LOAD = "ModelLoadError"
FAILED_VALUE = "ValueError"
FAILED_TYPE = "TypeError"
FAILED_RUNTIME = "RuntimeError"  # a crash, a kill, or anything unexpected
FAILED_SHUTDOWN = "Shutdown"  # not a failure of the core: the engine was shut down


class ModelLoadError(ValueError):
    """A model folder, config or checkpoint is missing or does not fit the model (raised again in the front
    when the core process reports it)."""


_FAILURE_TYPES: dict[str, type[Exception]] = {
    FAILED_MODEL_LOAD: ModelLoadError,
    FAILED_VALUE: ValueError,
    FAILED_TYPE: TypeError,
}


@dataclass
class CoreFailed:
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    @classmethod
    def from_exception(cls, exc: BaseException) -> CoreFailed:
        """The most specific known kind; the message keeps an unexpected class's name."""
        kind = next((k for k, t in _FAILURE_TYPES.items() if isinstance(exc, t)), FAILED_RUNTIME)
        name = type(exc).__name__
        return cls(kind, str(exc) if name == kind else f"{name}: {exc}")

    def to_exception(self) -> Exception:
        """The exception to raise in the front for a core that failed to start."""
        exc_type = _FAILURE_TYPES.get(self.kind)
        if exc_type is None:
            return RuntimeError(f"the engine core failed to start: {self.message}")
        return exc_type(self.message)


# ---- codec ---------------------------------------------------------------------------------------
_MESSAGES: tuple[type, ...] = (
    AddRequest,
    AbortRequest,
    FlushCache,
    GetServerInfo,
    CheckInvariants,
    Shutdown,
    ControlReply,
    StepOutputs,
    CoreReady,
    CoreFailed,
)
MESSAGE_TYPES: dict[str, type] = {cls.__name__: cls for cls in _MESSAGES}


class _Codec:
    """Dataclasses to plain msgpack maps and back; nested dataclasses are listed by field."""

    NESTED: ClassVar[dict[tuple[type, str], type]] = {
        (CoreReady, "model_info"): ModelInfo,
    }

    @staticmethod
    def output_to_wire(o: RequestOutput) -> list[Any]:
        # A positional list, not a map: a step's outputs are the bulk of the traffic (hundreds per step).
        # The logprob and embedding fields only when one is set: a plain decode's output is 6 values.
        fr = o.finish_reason
        reason = None if fr is None else [fr.type, fr.matched, fr.length, fr.message, fr.abort_kind]
        head = [o.rid, o.new_token_ids, reason, o.prompt_tokens, o.completion_tokens, o.cached_tokens]
        lps, tops, in_lps, in_tops = (
            o.new_logprobs,
            o.new_top_logprobs,
            o.new_input_logprobs,
            o.new_input_top_logprobs,
        )
        if lps or tops or in_lps or in_tops or o.embedding is not None:
            head += [lps, tops, in_lps, in_tops, o.embedding]
        return head

    @staticmethod
    def output_from_wire(w: list[Any]) -> RequestOutput:
        if len(w) == 6:
            rid, ids, reason, prompt, completion, cached = w
            fr = None if reason is None else FinishReason(*reason)
            return RequestOutput(rid, ids, fr, prompt, completion, cached, [], [], [], [], None)
        rid, ids, reason, prompt, completion, cached, lps, tops, in_lps, in_tops, embedding = w
        fr = None if reason is None else FinishReason(*reason)
        return RequestOutput(
            rid,
            ids,
            fr,
            prompt,
            completion,
            cached,
            lps,
            [[tuple(p) for p in row] for row in tops],
            in_lps,
            [[tuple(p) for p in row] for row in in_tops],
            embedding,
        )


def encode(msg: Any) -> bytes:
    name = type(msg).__name__
    if MESSAGE_TYPES.get(name) is not type(msg):
        raise TypeError(f"not a radixlm message: {type(msg).__name__}")
    if isinstance(msg, StepOutputs):
        body: Any = [_Codec.output_to_wire(o) for o in msg.outputs]
    else:
        body = dataclasses.asdict(msg)
    return msgpack.packb([name, body], use_bin_type=True)


def decode(data: bytes) -> Any:
    raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(raw, list) or len(raw) != 2:
        raise ValueError("malformed message: expected [type, body]")
    name, body = raw
    cls = MESSAGE_TYPES.get(name)
    if cls is None:
        raise ValueError(f"unknown message type {name!r}")
    if cls is StepOutputs:
        return StepOutputs([_Codec.output_from_wire(w) for w in body])
    for (owner, fname), nested in _Codec.NESTED.items():
        if owner is cls:
            body[fname] = nested(**body[fname])
    return cls(**body)
