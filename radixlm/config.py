"""EngineConfig: every engine option in one frozen, validated dataclass.

CLI flags are generated from these fields (see `radixlm/cli_args.py`), so a new option is added here once,
with its help text, and appears in `Engine(**options)`, `radixlm serve --flag` and the docs together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MODEL_IMPLS = ("auto", "native", "transformers")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SCHEDULE_POLICIES = ("fcfs", "lpm", "dfs-weight")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LINEAR_KERNELS = ("auto", "dense", "packed")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class EngineConfig:
    # --- model ---
    model_path: str = _opt(
        "", "Local model folder or Hugging Face Hub id. Empty: a locally written demo model."
    )
    tokenizer_path: str | None = _opt(None, "Tokenizer folder or Hub id (default: the model path).")
    model_impl: str = _opt(
        "auto",
        "auto: a native implementation when one exists, else the Transformers backend; "
        "native: require a native one; transformers: force the Transformers backend.",
        choices=MODEL_IMPLS,
    )
    trust_remote_code: bool = _opt(False, "Allow a model folder's own modeling code (auto_map) to run.")
    revision: str | None = _opt(None, "Hub revision (branch, tag or commit) to download.")
    dtype: str = _opt(
        "auto",
        "Weight and activation dtype. auto: the checkpoint's dtype (float32 stays float32).",
        choices=DTYPES,
    )
    device: str = _opt("auto", "auto (cuda when present, else cpu), cpu, cuda or cuda:N.")
    context_length: int | None = _opt(None, "Maximum tokens per sequence (default: from the model config).")
    chat_template: str | None = _opt(None, "A Jinja chat template, or a path to a file holding one.")
    # --- memory and scheduling ---
    max_total_tokens: int | None = _opt(None, "KV pool size in tokens (default: from --mem-fraction-static).")
    mem_fraction_static: float | None = _opt(
        None, "Fraction of free device memory (RAM on CPU) for the KV pool, measured after the weights load."
    )
    max_running_requests: int | None = _opt(None, "Maximum requests in the running batch (default 256).")
    max_prefill_tokens: int = _opt(16384, "Token budget for new prompt tokens admitted in one step.")
    chunked_prefill_size: int | None = _opt(
        None,
        "Largest prompt span computed in one step; -1 disables chunking (default: 8192 on GPU, 1024 on CPU).",
    )
    schedule_policy: str = _opt("fcfs", "Order of waiting requests.", choices=SCHEDULE_POLICIES)
    disable_radix_cache: bool = _opt(False, "Do not reuse KV across requests (no prefix cache).")
    page_size: int = _opt(1, "Tokens per KV page.")
    random_seed: int | None = _opt(None, "Seed for requests that do not set one (default: random).")
    tp_size: int = _opt(
        1,
        "Tensor-parallel ranks: processes that each hold 1/N of every linear layer and of the KV heads, "
        "joined through torch.distributed (gloo on CPU, NCCL on CUDA, one GPU per rank).",
    )
    linear_kernel: str = _opt(
        "auto",
        "CPU matmul kernel for linear layers. auto: per weight shape, oneDNN's prepacked linear where it "
        "measured faster on this machine (decisions kept in ~/.cache/radixlm/linear-kernels.json), else "
        "F.linear; dense: F.linear everywhere (transformers' kernel); packed: prepacked everywhere.",
        choices=LINEAR_KERNELS,
    )
    # --- operations ---
    log_level: str = _opt("info", "Logging level.", choices=LOG_LEVELS)
    enable_metrics: bool = _opt(False, "Collect Prometheus metrics (served at /metrics).")
    stream_interval: int = _opt(1, "Send a streaming update every this many tokens.")
    inline_core: bool = _opt(
        False, "Run the engine core in the calling process instead of its own process (debugging, tests)."
    )

    def __post_init__(self) -> None:
        _check_choice("model_impl", self.model_impl, MODEL_IMPLS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("schedule_policy", self.schedule_policy, SCHEDULE_POLICIES)
        _check_choice("log_level", self.log_level, LOG_LEVELS)
        _check_choice("linear_kernel", self.linear_kernel, LINEAR_KERNELS)
        if not isinstance(self.model_path, str):
            raise TypeError(f"model_path must be a string, got {type(self.model_path).__name__}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {dev!r}")
        for name in ("context_length", "max_total_tokens", "max_running_requests", "tp_size"):
            _check_positive_int(name, getattr(self, name), optional=True)
        for name in ("max_prefill_tokens", "page_size", "stream_interval"):
            _check_positive_int(name, getattr(self, name), optional=False)
        cps = self.chunked_prefill_size
        if cps is not None and cps != -1:
            _check_positive_int("chunked_prefill_size", cps, optional=False)
        msf = self.mem_fraction_static
        if msf is not None and not (isinstance(msf, (int, float)) and 0.0 < msf < 1.0):
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {msf!r}")
        if self.random_seed is not None and (
            isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int)
        ):
            raise ValueError(f"random_seed must be an integer, got {self.random_seed!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """Build from keyword options; an unknown option is a TypeError that lists the valid ones."""
        valid = set(cls.field_names())
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(
                f"unknown Engine option(s) {unknown}; valid options are: {', '.join(sorted(valid))}"
            )
        return cls(**options)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive_int(name: str, value: Any, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ---- the runtime: every default decided once ------------------------------------------------------
DEFAULT_MAX_RUNNING_REQUESTS = 256
DEFAULT_CHUNKED_PREFILL = {"cpu": 1024, "cuda": 8192}
DEFAULT_MEM_FRACTION = {"cpu": 0.25, "cuda": 0.85}
# On a CPU the KV pool shares RAM with everything else on the machine (another engine, the tokenizer, the
# page cache). A 135M model once took 4.6 GB of a shared machine's RAM for its pool (25% of free RAM) and
# was OOM-killed beside another engine; 2 GiB still holds ~90k tokens of SmolLM2-135M or ~175k of a
# Qwen2.5-0.5B in bf16. --max-total-tokens (or --mem-fraction-static) lifts it.
DEFAULT_CPU_KV_CAP_BYTES = 2 << 30
DEFAULT_CONTEXT_LENGTH = 4096  # when the model config names none


@dataclass(frozen=True)
class ModelFacts:
    """What the runtime defaults depend on, measured by the model runner after the weights loaded."""

    device_type: str  # "cpu" or "cuda"
    model_context_length: int | None  # max_position_embeddings, if the config has it
    kv_bytes_per_token: int
    free_memory_bytes: int  # device memory on CUDA, available RAM on CPU, after the weights loaded


@dataclass(frozen=True)
class RuntimeConfig:
    """The engine's effective settings: EngineConfig with every default resolved (get_server_info shows it)."""

    device_type: str
    context_length: int
    max_running_requests: int
    max_prefill_tokens: int
    chunked_prefill_size: int | None  # None: chunking off
    page_size: int
    kv_capacity: int  # tokens, a whole number of pages
    kv_capacity_reason: str
    schedule_policy: str
    disable_radix_cache: bool

    @property
    def num_kv_pages(self) -> int:
        return self.kv_capacity // self.page_size

    @classmethod
    def resolve(cls, config: EngineConfig, facts: ModelFacts) -> RuntimeConfig:
        context = config.context_length or facts.model_context_length or DEFAULT_CONTEXT_LENGTH
        max_running = config.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS
        chunk = config.chunked_prefill_size
        if chunk is None:
            chunk = DEFAULT_CHUNKED_PREFILL.get(facts.device_type, DEFAULT_CHUNKED_PREFILL["cuda"])
        capacity, reason = _kv_capacity(config, facts, context, max_running)
        capacity = capacity // config.page_size * config.page_size
        if capacity < config.page_size:
            raise ValueError(
                f"the KV pool would hold {capacity} tokens, less than one page ({config.page_size}); "
                f"free memory is {facts.free_memory_bytes / 2**20:.0f} MiB at {facts.kv_bytes_per_token} "
                "bytes per token: raise --max-total-tokens or --mem-fraction-static"
            )
        return cls(
            device_type=facts.device_type,
            context_length=int(context),
            max_running_requests=max_running,
            max_prefill_tokens=config.max_prefill_tokens,
            chunked_prefill_size=None if chunk == -1 else chunk,
            page_size=config.page_size,
            kv_capacity=capacity,
            kv_capacity_reason=reason,
            schedule_policy=config.schedule_policy,
            disable_radix_cache=config.disable_radix_cache,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _kv_capacity(config: EngineConfig, facts: ModelFacts, context: int, max_running: int) -> tuple[int, str]:
    """KV pool tokens and the reason, for the log: the smallest of what memory allows and what the
    workload can ever use."""
    if config.max_total_tokens is not None:
        return config.max_total_tokens, "--max-total-tokens"
    per_token = facts.kv_bytes_per_token
    fraction = config.mem_fraction_static or DEFAULT_MEM_FRACTION.get(facts.device_type, 0.85)
    limits = {
        f"{fraction:g} of {facts.free_memory_bytes / 2**30:.1f} GiB free": int(facts.free_memory_bytes * fraction)
        // per_token,
        # More than every running request at full context is never used.
        f"{max_running} requests x {context} tokens": max_running * context,
    }
    if facts.device_type == "cpu" and config.mem_fraction_static is None:
        limits[f"the CPU cap of {DEFAULT_CPU_KV_CAP_BYTES / 2**30:g} GiB"] = DEFAULT_CPU_KV_CAP_BYTES // per_token
    name, tokens = min(limits.items(), key=lambda kv: kv[1])
    return tokens, f"{name} (the smallest of: {', '.join(limits)})"
