"""`radixlm bench offline`: throughput on random prompts, radixlm against transformers in one run.

Systems, one after another on the same requests (one model in memory at a time):
  radixlm                              Engine.generate over all requests at once (ignore_eos, greedy)
  radixlm + json_schema (--json-schema) the same requests, each constrained by the schema, same engine
  transformers generate (batch N)      static batches of N in arrival order, left-padded; see hf_baselines
  transformers generate_batch (CB)     transformers' continuous batching, per-request max_new_tokens
  vLLM (optional, --vllm-python)       one LLM.generate over all requests, in vLLM's own process; see
                                       vllm_baseline
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from radixlm.bench import hf_baselines as hf
from radixlm.bench import vllm_baseline as vb
from radixlm.bench.common import (
    fastest_round,
    make_result,
    radixlm_result,
    resolve_config,
    rounds_note,
    run_radixlm,
    start_engine,
    warmup_jobs,
)
from radixlm.bench.hf_baselines import GENERATE_BATCH, Job
from radixlm.bench.report import BenchReport, SystemResult, environment
from radixlm.bench.workloads import load_token_pool, random_requests
from radixlm.config import EngineConfig


@dataclass
class OfflineOptions:
    num_requests: int = 64
    min_prompt: int = 64
    max_prompt: int = 512
    min_output: int = 32
    max_output: int = 128
    seed: int = 0
    hf_batch_sizes: tuple[int, ...] = (8, 16)
    skip_hf_generate: bool = False
    skip_generate_batch: bool = False
    cb: hf.ContinuousBatchingOptions = field(default_factory=hf.ContinuousBatchingOptions)
    vllm: vb.VllmOptions | None = None  # None: no vLLM row
    # A JSON schema (text) put on every request for a second radixlm row: what constrained decoding costs.
    json_schema: str | None = None
    # Each system runs the requests this many times (caches dropped between); its fastest round counts.
    rounds: int = 1


# --json-schema default: a schema no request can complete within --max-output tokens (the string needs
# more characters than that), so every constrained request decodes exactly as many tokens as the
# unconstrained one and the two rows compare the same work; the mask still changes every step.
DEFAULT_BENCH_SCHEMA = (
    '{"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999}, '
    '"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}, '
    '"text": {"type": "string", "minLength": 2048}}, "required": ["id", "tags", "text"]}'
)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def with_rounds(result: SystemResult, seconds: list[float]) -> SystemResult:
    if len(seconds) > 1:
        result.notes.append(rounds_note(seconds))
        result.extra["round_seconds"] = seconds
    return result


def static_generate_result(model, jobs, batch_size: int, rounds: int = 1) -> SystemResult:
    outputs, seconds, all_seconds = fastest_round(rounds, lambda: hf.generate_static(model, jobs, batch_size))
    result = make_result(
        f"transformers generate (batch {batch_size})", jobs, [len(o) for o in outputs], seconds
    )
    with_rounds(result, all_seconds)
    result.notes.append(
        f"static batches of {batch_size} in arrival order, left-padded; each batch decodes its longest "
        f"request's length (EOS off): {result.output_tokens:,} of {result.generated_tokens:,} decoded "
        "tokens were requested and counted"
    )
    return result


def run_offline(config: EngineConfig, opts: OfflineOptions, log: Callable[[str], None] = _log) -> BenchReport:
    config = resolve_config(config)
    pool = load_token_pool(config.model_path)
    requests = random_requests(
        pool,
        opts.num_requests,
        (opts.min_prompt, opts.max_prompt),
        (opts.min_output, opts.max_output),
        opts.seed,
    )
    jobs = [(r.prompt_ids, r.max_new_tokens) for r in requests]
    warmup = warmup_jobs(pool, opts.seed)
    report = BenchReport(
        "offline",
        {
            "requests": opts.num_requests,
            "prompt_len": f"{opts.min_prompt}-{opts.max_prompt}",
            "output_len": f"{opts.min_output}-{opts.max_output}",
            "prompt_tokens": sum(len(p) for p, _ in jobs),
            "requested_output_tokens": sum(n for _, n in jobs),
            "seed": opts.seed,
        },
        environment=environment(config.model_path, config.dtype),
    )

    log(f"radixlm: {len(jobs)} requests" + (f", {opts.rounds} rounds" if opts.rounds > 1 else ""))
    engine = start_engine(config, warmup)
    try:
        outs, seconds, all_seconds = fastest_round(opts.rounds, lambda: _flushed_run(engine, jobs))
        base = report.add(with_rounds(radixlm_result("radixlm", jobs, outs, seconds), all_seconds))
        if opts.json_schema is not None:
            _run_constrained(report, engine, base, jobs, warmup, opts.json_schema, log)
    finally:
        engine.shutdown()

    statics = _run_transformers(report, config, opts, jobs, warmup, log)
    if opts.vllm is not None:
        _run_vllm(report, config, opts, jobs, warmup, [o["output_ids"] for o in outs], log)
    add_headlines(report, statics)
    return report


def _flushed_run(engine: Any, jobs: list[Job]) -> tuple[list[dict[str, Any]], float]:
    engine.flush_cache()  # a round after the first must not hit the prompts the one before cached
    return run_radixlm(engine, jobs)


def _run_constrained(
    report: BenchReport,
    engine: Any,
    base: SystemResult,
    jobs: list[Job],
    warmup: list[Job],
    schema: str,
    log: Callable[[str], None],
) -> None:
    """The same requests with the schema on each, on the same engine with the cache flushed before every
    run; the grammar is compiled by a warmup first (compiling is once per schema: this measures the
    per-step masks). Constrained and unconstrained runs alternate and each side keeps its best of two, so
    a shared machine's load drift does not pass for the grammar's cost."""
    extra = {"json_schema": schema}
    engine.flush_cache()
    run_radixlm(engine, warmup, extra)
    best_plain, best = base, None
    for attempt in range(2):
        log(f"radixlm + json_schema: {len(jobs)} requests (run {attempt + 1} of 2)")
        engine.flush_cache()
        outs, seconds = run_radixlm(engine, jobs, extra)
        res = radixlm_result("radixlm + json_schema", jobs, outs, seconds)
        best = res if best is None or res.tok_per_s > best.tok_per_s else best
        if attempt == 0:
            engine.flush_cache()
            outs, seconds = run_radixlm(engine, jobs)
            again = radixlm_result("radixlm", jobs, outs, seconds)
            best_plain = again if again.tok_per_s > best_plain.tok_per_s else best_plain
    assert best is not None
    res = report.add(best)
    res.notes.append(
        "every request constrained by --json-schema (xgrammar bitmask each step); best of 2 runs, "
        f"interleaved with unconstrained ones (best unconstrained: {best_plain.tok_per_s:.1f} out tok/s)"
    )
    if best_plain.tok_per_s > 0:
        kept = res.tok_per_s / best_plain.tok_per_s
        report.headlines.append(
            f"json_schema on every request: {kept:.2f}x of unconstrained output tok/s "
            f"({(1 - kept) * 100:.1f}% cost, batch {len(jobs)}, best of 2 each)"
        )


def _run_vllm(
    report: BenchReport,
    config: EngineConfig,
    opts: OfflineOptions,
    jobs: list[Job],
    warmup: list[Job],
    reference: list[list[int]],
    log: Callable[[str], None],
) -> None:
    """The vLLM row, from its own process; a failure becomes a headline and keeps the other rows."""
    try:
        result = vb.run_job(
            config.model_path,
            config.dtype,
            opts.seed,
            opts.vllm,
            warmup,
            [vb.batch_run(f"offline-{r}", jobs) for r in range(opts.rounds)],
            log,
        )
        seconds = [run["seconds"] for run in result["runs"]]
        fastest = min(range(len(seconds)), key=seconds.__getitem__)
        res = report.add(vb.batch_result(result, f"offline-{fastest}", jobs, reference, config.dtype))
        with_rounds(res, seconds)
    except vb.VllmError as e:
        vb.report_failure([report], e, log)


def _run_transformers(
    report: BenchReport,
    config: EngineConfig,
    opts: OfflineOptions,
    jobs: list[Job],
    warmup: list[Job],
    log: Callable[[str], None],
) -> list[SystemResult]:
    if opts.skip_hf_generate and opts.skip_generate_batch:
        return []
    hf.quiet_transformers_logs()
    model = hf.load_hf_model(config.model_path, config.dtype, config.device)
    statics: list[SystemResult] = []
    if not opts.skip_hf_generate:
        hf.generate_static(model, warmup, len(warmup))
        # A batch size at or above the request count is one batch: run that case once.
        for bs in sorted({min(b, len(jobs)) for b in opts.hf_batch_sizes}):
            log(f"transformers generate, static batches of {bs}")
            statics.append(report.add(static_generate_result(model, jobs, bs, opts.rounds)))
    if not opts.skip_generate_batch:
        log("transformers continuous batching (generate_batch)")
        cb = hf.ContinuousBatching(
            model,
            max_prompt_len=max(len(p) for p, _ in jobs),
            max_new_tokens=max(n for _, n in jobs),
            max_concurrent=len(jobs),
            options=opts.cb,
        )
        keyed = {f"r{i}": job for i, job in enumerate(jobs)}
        # each round a new session (a fresh cache), with its warmup
        results, seconds, all_seconds = fastest_round(opts.rounds, lambda: cb.run(keyed, warmup=warmup))
        res = report.add(
            make_result(GENERATE_BATCH, jobs, [len(results[f"r{i}"]) for i in range(len(jobs))], seconds)
        )
        with_rounds(res, all_seconds)
        res.extra.update(cb.describe())
        res.notes.append(
            "continuous_batching_context_manager + add_request(max_new_tokens=per request, eos_token_id=-1): "
            "the manager generate_batch wraps (generate_batch takes one max_new_tokens for all); "
            f"max_batch_tokens={cb.cb_config.max_batch_tokens}, num_blocks={cb.cb_config.num_blocks}"
        )
    del model
    return statics


def add_headlines(report: BenchReport, statics: list[SystemResult]) -> None:
    if statics:
        best = max(statics, key=lambda r: r.tok_per_s)
        best.extra["best_static_batch"] = True
        ratio = report.ratio(best)
        if ratio is not None:
            report.headlines.append(f"radixlm vs best static generate ({best.system}): {ratio:.2f}x")
    cb = next((r for r in report.results if r.system == GENERATE_BATCH), None)
    if cb is not None and (ratio := report.ratio(cb)) is not None:
        report.headlines.append(f"radixlm vs transformers generate_batch: {ratio:.2f}x")
    for r in report.results:
        if vb.is_vllm(r) and (ratio := report.ratio(r)) is not None:
            report.headlines.append(f"radixlm vs {r.system}: {ratio:.2f}x")
