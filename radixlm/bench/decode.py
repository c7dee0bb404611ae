"""`radixlm bench decode`: batch-1 decode speed against this machine's memory-bandwidth bound.

    radixlm bench decode --dtype float32                                     # the 0.5B shape
    radixlm bench decode --dtype float32 --vllm-python /work/vllm-venv/bin/python
    radixlm bench decode --model-path FILE.gguf --quantization gguf --llama-cpp-python /work/llama-venv/bin/python
    radixlm bench decode --model-path "$(python -c 'from radixlm.config import packaged_model_path as p; print(p())')" \
        --dtype float32 --impls auto,transformers                            # SmolLM2: native vs backend

At batch 1 a decode step reads every weight once, so a CPU cannot decode faster than (memory bandwidth) /
(weight bytes read per token). This benchmark measures that bandwidth in the same run (a streaming copy,
`dst.copy_(src)` over buffers far larger than the caches, with the engines' thread count: 2 x bytes per
second, the best of several passes) and prints the bound next to each system's rate.

Each system decodes one prompt of `--prompt-len` random tokens twice per round: once for 1 new token and
once for 1 + `--decode-tokens`; the decode rate is decode_tokens / (the difference of the two times), so
prefill and start-up never count. Every system's cache is emptied before each call (radixlm: flush_cache;
vLLM: its prefix cache reset between runs; transformers has none). The best round counts. Systems:
radixlm once per `--impls` entry (with `--quantization` when given, e.g. `gguf`: a GGUF file's 4-bit blocks
on the int4 kernel), transformers' `generate` (unless `--skip-hf-generate`), vLLM's CPU build in its own
process with `--vllm-python`, and llama.cpp (llama-cpp-python, its own interpreter: `--llama-cpp-python`)
on the same .gguf file, with the same thread count.

Bytes read per token: every parameter of the model, except that an input embedding table not shared with
the LM head is read one row per token (counted as zero); the KV cache at these lengths is noise.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from radixlm.config import EngineConfig

COPY_MIB = 512


@dataclass
class DecodeRow:
    system: str
    decode_tok_s: float
    rounds: list[float] = field(default_factory=list)
    # The bound is for the float weights in --dtype: a row whose weights are quantized reads fewer bytes.
    float_weights: bool = True

    def ms_per_token(self) -> float:
        return 1e3 / self.decode_tok_s if self.decode_tok_s > 0 else float("nan")


@dataclass
class DecodeReport:
    model_path: str
    dtype: str
    threads: int
    bandwidth_gb_s: float
    bytes_per_token: int
    rows: list[DecodeRow]
    notes: list[str] = field(default_factory=list)

    @property
    def bound_tok_s(self) -> float:
        return self.bandwidth_gb_s * 1e9 / self.bytes_per_token

    def table(self) -> str:
        head = [
            f"batch-1 decode, {self.model_path} ({self.dtype}, {self.threads} threads)",
            f"streaming copy: {self.bandwidth_gb_s:.2f} GB/s; weights read per token: "
            f"{self.bytes_per_token / 2**20:.1f} MiB; bound: {self.bound_tok_s:.2f} tok/s",
            "",
            f"{'system':<40} {'tok/s':>8} {'ms/tok':>8} {'of bound':>9} {'radixlm x':>10}",
        ]
        first = self.rows[0].decode_tok_s if self.rows else float("nan")
        lines = [
            f"{r.system:<40} {r.decode_tok_s:>8.2f} {r.ms_per_token():>8.1f} "
            + (f"{r.decode_tok_s / self.bound_tok_s:>8.0%}" if r.float_weights else f"{'-':>8}")
            + f" {first / r.decode_tok_s:>10.2f}"
            for r in self.rows
        ]
        if any(not r.float_weights for r in self.rows):
            lines.append("('-': quantized weights, fewer bytes per token than the float bound assumes)")
        return "\n".join(head + lines + [f"note: {n}" for n in self.notes])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "dtype": self.dtype,
            "threads": self.threads,
            "bandwidth_gb_s": self.bandwidth_gb_s,
            "bytes_per_token": self.bytes_per_token,
            "bound_tok_s": self.bound_tok_s,
            "rows": [{**r.__dict__, "ms_per_token": r.ms_per_token()} for r in self.rows],
            "notes": self.notes,
        }


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, help="model folder or .gguf (default: the 0.5B shape)")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default: 32)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="timed decode tokens (default: 64)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per system; the best counts (default: 3)"
    )
    parser.add_argument(
        "--impls",
        default="auto",
        help="radixlm implementations, comma-separated: auto,transformers; IMPL+compile adds a row with "
        "--enable-torch-compile (e.g. auto,auto+compile)",
    )
    parser.add_argument(
        "--quantization", default=None, help="radixlm's rows: --quantization (e.g. gguf, int8, int4)"
    )
    parser.add_argument("--skip-hf-generate", action="store_true", help="no transformers generate row")
    parser.add_argument(
        "--llama-cpp-python",
        metavar="PATH",
        default=None,
        help="python of an environment with llama-cpp-python: adds a llama.cpp row on the same .gguf file",
    )
    from radixlm.bench.vllm_baseline import add_vllm_args

    add_vllm_args(parser)


def copy_bandwidth_gb_s(mib: int = COPY_MIB, passes: int = 5) -> float:
    """Bytes read plus bytes written per second by `dst.copy_(src)`, best of `passes`."""
    import torch

    n = mib * 2**20 // 4
    src, dst = torch.ones(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    dst.copy_(src)  # first touch of dst's pages is not bandwidth
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best / 1e9


def weight_bytes_per_token(model: Any) -> int:
    """Every parameter once; an embedding table that is not also the LM head reads one row per token."""
    seen: set[int] = set()
    total = sum(
        p.numel() * p.element_size() for p in model.parameters() if not (id(p) in seen or seen.add(id(p)))
    )
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != emb.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def _load_hf(model_path: str, dtype: str) -> Any:
    import os

    import torch
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if model_path.endswith(".gguf"):
        kw["gguf_file"] = os.path.basename(model_path)
        model_path = os.path.dirname(model_path) or "."
    return AutoModelForCausalLM.from_pretrained(model_path, **kw).eval()


def two_point_rate(timed: Callable[[int], float], decode_tokens: int) -> float:
    """decode_tokens / (time for 1 + decode_tokens new tokens - time for 1 new token)."""
    one = timed(1)
    return rate_between(one, timed(1 + decode_tokens), decode_tokens)


def rate_between(one_s: float, full_s: float, decode_tokens: int) -> float:
    """decode_tokens / (full_s - one_s); nan when the longer run timed no slower (noise swamped it)."""
    return decode_tokens / (full_s - one_s) if full_s > one_s else float("nan")


def best_rate(rates: list[float]) -> float:
    """The fastest round that measured anything: a round whose long run came out no slower than its
    one-token run (a scheduling hiccup on a shared machine) is nan, and max() would return it if first."""
    finite = [r for r in rates if r == r]
    return max(finite) if finite else float("nan")


def _radixlm_row(config: EngineConfig, impl: str, prompt: list[int], ns: argparse.Namespace) -> DecodeRow:
    from radixlm import Engine

    impl, _, variant = impl.partition("+")
    if variant not in ("", "compile"):
        raise ValueError(f"--impls entry {impl}+{variant}: the only variant is +compile")
    compiled = variant == "compile"
    config = config.replace(model_impl=impl, enable_torch_compile=compiled)
    engine = Engine(**{f: getattr(config, f) for f in EngineConfig.field_names()})
    try:
        info = engine.get_model_info()
        label = f"radixlm ({info['model_impl']}{', torch.compile' if compiled else ''})"
        dense = info.get("quantization", "none") == "none"

        def timed(n: int) -> float:
            engine.flush_cache()
            t = time.perf_counter()
            out = engine.generate(
                input_ids=prompt, sampling_params={"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
            )
            seconds = time.perf_counter() - t
            if len(out["output_ids"]) != n:
                raise RuntimeError(f"{label} decoded {len(out['output_ids'])} tokens, asked for {n}")
            return seconds

        timed(8)  # warm-up
        rates = [two_point_rate(timed, ns.decode_tokens) for _ in range(ns.rounds)]
    finally:
        engine.shutdown()
    return DecodeRow(label, best_rate(rates), rates, float_weights=dense)


def _hf_row(model: Any, prompt: list[int], ns: argparse.Namespace) -> DecodeRow:
    import torch

    ids = torch.tensor([prompt])

    def timed(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        if out.shape[1] - ids.shape[1] != n:
            raise RuntimeError(
                f"transformers generate decoded {out.shape[1] - ids.shape[1]} tokens, asked {n}"
            )
        return time.perf_counter() - t

    timed(8)
    rates = [two_point_rate(timed, ns.decode_tokens) for _ in range(ns.rounds)]
    return DecodeRow("transformers generate", best_rate(rates), rates)


def _vllm_row(model_path: str, dtype: str, prompt: list[int], ns: argparse.Namespace) -> DecodeRow:
    from radixlm.bench.vllm_baseline import batch_run, options_from_args, run_job, system_name

    opts = options_from_args(ns)
    runs = []
    for r in range(ns.rounds):
        runs.append(batch_run(f"one-{r}", [(prompt, 1)]))
        runs.append(batch_run(f"full-{r}", [(prompt, 1 + ns.decode_tokens)]))
    result = run_job(model_path, dtype, ns.seed, opts, [(prompt, 8)], runs, log=print)
    seconds = {run["name"]: run["seconds"] for run in result["runs"]}
    rates = [
        rate_between(seconds[f"one-{r}"], seconds[f"full-{r}"], ns.decode_tokens) for r in range(ns.rounds)
    ]
    return DecodeRow(system_name(result), best_rate(rates), rates)


def _llama_cpp_row(model_path: str, prompt: list[int], threads: int, ns: argparse.Namespace) -> DecodeRow:
    """llama.cpp on the same file and prompt ids, in its own interpreter (llama_cpp_worker.py)."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    worker = Path(__file__).with_name("llama_cpp_worker.py")
    with tempfile.TemporaryDirectory(prefix="radixlm-llama-cpp-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(
            json.dumps(
                {
                    "model": model_path,
                    "prompt": prompt,
                    "decode_tokens": ns.decode_tokens,
                    "rounds": ns.rounds,
                    "threads": threads,
                    "n_ctx": ns.prompt_len + ns.decode_tokens + 64,
                }
            )
        )
        proc = subprocess.run(
            [ns.llama_cpp_python, str(worker), str(job), str(result)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if not result.exists():
            raise RuntimeError(f"{ns.llama_cpp_python} exited {proc.returncode}: {proc.stderr[-2000:]}")
        out = json.loads(result.read_text())
    if not out.get("ok"):
        raise RuntimeError(out.get("error", "unknown error"))
    rates = []
    for r in out["rounds"]:
        if r["generated"] != 1 + ns.decode_tokens:
            raise RuntimeError(
                f"llama.cpp generated {r['generated']} tokens, asked for {1 + ns.decode_tokens}"
            )
        rates.append(rate_between(r["one"], r["full"], ns.decode_tokens))
    return DecodeRow(f"llama.cpp {out['version']}", best_rate(rates), rates, float_weights=False)


def run_decode_bench(ns: argparse.Namespace) -> DecodeReport:
    import torch

    from radixlm.bench.common import default_model_path

    model_path = ns.model_path or default_model_path()
    threads = torch.get_num_threads()
    config = EngineConfig(
        model_path=model_path,
        dtype=ns.dtype,
        inline_core=True,
        log_level="warning",
        max_total_tokens=4 * (ns.prompt_len + ns.decode_tokens) + 256,
        context_length=ns.prompt_len + ns.decode_tokens + 64,
        random_seed=ns.seed,
        quantization=ns.quantization,
    )
    hf = _load_hf(model_path, ns.dtype)
    vocab = hf.config.vocab_size
    rng = random.Random(ns.seed)
    prompt = [rng.randrange(3, vocab) for _ in range(ns.prompt_len)]
    per_token = weight_bytes_per_token(hf)
    rows = [_radixlm_row(config, impl.strip(), prompt, ns) for impl in ns.impls.split(",") if impl.strip()]
    notes: list[str] = []
    if not ns.skip_hf_generate:
        rows.append(_hf_row(hf, prompt, ns))
    del hf
    if ns.vllm_python:
        if model_path.endswith(".gguf"):
            notes.append("no vLLM row: the benchmark gives vLLM model folders only")
        else:
            from radixlm.bench.vllm_baseline import VllmError

            try:
                rows.append(_vllm_row(model_path, ns.dtype, prompt, ns))
            except VllmError as e:
                notes.append(f"vLLM baseline failed, no vLLM row: {e}")
    if ns.llama_cpp_python:
        if not model_path.endswith(".gguf"):
            notes.append("no llama.cpp row: it runs .gguf files only")
        else:
            try:
                rows.append(_llama_cpp_row(model_path, prompt, threads, ns))
            except RuntimeError as e:
                notes.append(f"llama.cpp baseline failed, no llama.cpp row: {e}")
    # Bandwidth last, with the engines gone: the same threads and an otherwise idle process.
    bandwidth = copy_bandwidth_gb_s()
    return DecodeReport(model_path, ns.dtype, threads, bandwidth, per_token, rows, notes)
