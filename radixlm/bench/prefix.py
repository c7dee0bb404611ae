"""`radixlm bench prefix`: workloads where requests share prompt prefixes.

shared-prefix  `num_groups` system prompts of `prefix_len` tokens, each followed by `group_size` different
               questions of `question_len` tokens; all requests shuffled and sent at once.
multi-turn     `num_conversations` chats of `num_turns` turns; every turn resends the whole history (its
               previous prompt + the model's previous output + `turn_len` new tokens). Turns of a chat are
               sequential, chats run concurrently.

Systems: radixlm, radixlm with the radix cache disabled, transformers `generate` (static batches, per
turn for multi-turn) and transformers continuous batching (the `generate_batch` manager, which has its
own prefix block sharing). The cache hit rate is radixlm's sum of `cached_tokens` over prompt tokens.

With --vllm-python, vLLM runs both workloads in its own process after one start-up (see vllm_baseline):
shared-prefix as one LLM.generate over the same shuffled requests, multi-turn with the same arrival
structure as radixlm's (every first turn at once, each next turn when that conversation's previous turn
ends, the history built from vLLM's own output). vLLM's prefix cache is reset between the workloads and
caches whole KV blocks only (block_size tokens), where radixlm's radix cache matches to the token.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from radixlm.bench import hf_baselines as hf
from radixlm.bench import vllm_baseline as vb
from radixlm.bench.common import (
    make_result,
    radixlm_params,
    radixlm_result,
    resolve_config,
    run_radixlm,
    start_engine,
    warmup_jobs,
)
from radixlm.bench.hf_baselines import GENERATE_BATCH, Job
from radixlm.bench.report import REFERENCE, BenchReport, environment
from radixlm.bench.workloads import (
    Conversation,
    load_token_pool,
    multi_turn_conversations,
    shared_prefix_requests,
)
from radixlm.config import EngineConfig

NO_CACHE = "radixlm (radix cache off)"


@dataclass
class PrefixOptions:
    workloads: tuple[str, ...] = ("shared-prefix", "multi-turn")
    num_groups: int = 8
    group_size: int = 8
    prefix_len: int = 1024
    question_len: int = 64
    output_len: int = 32
    num_conversations: int = 16
    num_turns: int = 4
    first_turn_len: int = 512
    turn_len: int = 64
    seed: int = 0
    hf_batch_size: int = 8
    skip_hf_generate: bool = False
    skip_generate_batch: bool = False
    skip_no_cache: bool = False
    cb: hf.ContinuousBatchingOptions = field(default_factory=hf.ContinuousBatchingOptions)
    vllm: vb.VllmOptions | None = None  # None: no vLLM row


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---- multi-turn drivers: each returns the jobs as actually sent (history included), outputs, seconds ----


def radixlm_multi_turn(
    engine: Any, convs: list[Conversation]
) -> tuple[list[Job], list[dict[str, Any]], float]:
    """One asyncio task per conversation; each awaits its turn's output before sending the next turn."""
    sent: list[tuple[Job, dict[str, Any]]] = []

    async def conversation(conv: Conversation) -> None:
        prompt = list(conv.first_prompt)
        for k in range(conv.num_turns):
            out = await engine.async_generate(
                input_ids=prompt, sampling_params=radixlm_params(conv.output_len)
            )
            sent.append(((prompt, conv.output_len), out))
            if k + 1 < conv.num_turns:
                prompt = prompt + out["output_ids"][: conv.output_len] + conv.followups[k]

    async def run_all() -> None:
        await asyncio.gather(*(conversation(c) for c in convs))

    start = time.perf_counter()
    asyncio.run(run_all())
    seconds = time.perf_counter() - start
    return [job for job, _ in sent], [out for _, out in sent], seconds


def static_multi_turn(
    model: Any, convs: list[Conversation], batch_size: int
) -> tuple[list[Job], list[int], float]:
    """Turn by turn: every conversation's turn k, in static batches, before any turn k+1."""
    prompts = [list(c.first_prompt) for c in convs]
    jobs: list[Job] = []
    generated: list[int] = []
    start = time.perf_counter()
    for k in range(max(c.num_turns for c in convs)):
        active = [i for i, c in enumerate(convs) if k < c.num_turns]
        turn_jobs = [(prompts[i], convs[i].output_len) for i in active]
        outputs, _ = hf.generate_static(model, turn_jobs, batch_size)
        for i, job, out in zip(active, turn_jobs, outputs):
            jobs.append(job)
            generated.append(len(out))
            if k + 1 < convs[i].num_turns:
                prompts[i] = prompts[i] + out[: convs[i].output_len] + convs[i].followups[k]
    return jobs, generated, time.perf_counter() - start


def continuous_multi_turn(
    model: Any, convs: list[Conversation], options: hf.ContinuousBatchingOptions, warmup: list[Job]
) -> tuple[list[Job], list[int], float, dict[str, Any]]:
    """The next turn of a conversation is submitted as soon as its previous turn finishes."""
    longest = max(len(c.first_prompt) + sum(len(f) + c.output_len for f in c.followups) for c in convs)
    cb = hf.ContinuousBatching(
        model,
        max_prompt_len=longest,
        max_new_tokens=max(c.output_len for c in convs),
        max_concurrent=len(convs),
        options=options,
    )
    sent: dict[str, Job] = {f"c{i}-t0": (list(c.first_prompt), c.output_len) for i, c in enumerate(convs)}

    def on_finish(key: str, generated: list[int]) -> dict[str, Job]:
        ci, k = (int(x[1:]) for x in key.split("-"))
        conv = convs[ci]
        if k + 1 >= conv.num_turns:
            return {}
        prompt, n = sent[key]
        nxt = f"c{ci}-t{k + 1}"
        sent[nxt] = (prompt + generated[:n] + conv.followups[k], conv.output_len)
        return {nxt: sent[nxt]}

    first = dict(sent)
    results, seconds = cb.run(first, on_finish, warmup=warmup)
    keys = list(sent)
    return [sent[k] for k in keys], [len(results[k]) for k in keys], seconds, cb.describe()


# ---- the benchmark ----


def run_prefix(
    config: EngineConfig, opts: PrefixOptions, log: Callable[[str], None] = _log
) -> list[BenchReport]:
    config = resolve_config(config)
    pool = load_token_pool(config.model_path)
    env = environment(config.model_path, config.dtype)
    warmup = warmup_jobs(pool, opts.seed)
    reports: dict[str, BenchReport] = {}
    shared_jobs: list[Job] = []
    convs: list[Conversation] = []
    if "shared-prefix" in opts.workloads:
        reqs = shared_prefix_requests(
            pool,
            opts.num_groups,
            opts.group_size,
            opts.prefix_len,
            opts.question_len,
            opts.output_len,
            opts.seed,
        )
        shared_jobs = [(r.prompt_ids, r.max_new_tokens) for r in reqs]
        reports["shared-prefix"] = BenchReport(
            "prefix (shared-prefix)",
            {
                "groups": opts.num_groups,
                "per_group": opts.group_size,
                "prefix_len": opts.prefix_len,
                "question_len": opts.question_len,
                "output_len": opts.output_len,
                "prompt_tokens": sum(len(p) for p, _ in shared_jobs),
                "seed": opts.seed,
            },
            environment=env,
        )
    if "multi-turn" in opts.workloads:
        convs = multi_turn_conversations(
            pool,
            opts.num_conversations,
            opts.num_turns,
            opts.first_turn_len,
            opts.turn_len,
            opts.output_len,
            opts.seed,
        )
        reports["multi-turn"] = BenchReport(
            "prefix (multi-turn)",
            {
                "conversations": opts.num_conversations,
                "turns": opts.num_turns,
                "first_turn_len": opts.first_turn_len,
                "turn_len": opts.turn_len,
                "output_len": opts.output_len,
                "seed": opts.seed,
            },
            environment=env,
        )

    reference: dict[str, Any] = {}  # radixlm's outputs, for the vLLM row's token comparison
    variants = [(REFERENCE, config)]
    if not opts.skip_no_cache:
        variants.append((NO_CACHE, config.replace(disable_radix_cache=True)))
    for name, cfg in variants:
        engine = start_engine(cfg, warmup)
        try:
            if shared_jobs:
                log(f"{name}: shared-prefix, {len(shared_jobs)} requests")
                outs, seconds = run_radixlm(engine, shared_jobs)
                reports["shared-prefix"].add(radixlm_result(name, shared_jobs, outs, seconds))
                if name == REFERENCE:
                    reference["shared-prefix"] = [o["output_ids"] for o in outs]
            if convs:
                engine.flush_cache()
                log(f"{name}: multi-turn, {len(convs)} conversations x {opts.num_turns} turns")
                jobs, outs, seconds = radixlm_multi_turn(engine, convs)
                reports["multi-turn"].add(radixlm_result(name, jobs, outs, seconds))
                if name == REFERENCE:
                    reference["multi-turn"] = {tuple(p): o["output_ids"] for (p, _), o in zip(jobs, outs)}
        finally:
            engine.shutdown()

    if not (opts.skip_hf_generate and opts.skip_generate_batch):
        hf.quiet_transformers_logs()
        model = hf.load_hf_model(config.model_path, config.dtype, config.device)
        bs = opts.hf_batch_size
        if not opts.skip_hf_generate:
            hf.generate_static(model, warmup, len(warmup))
            if shared_jobs:
                log(f"transformers generate: shared-prefix, static batches of {bs}")
                outputs, seconds = hf.generate_static(model, shared_jobs, bs)
                res = make_result(
                    f"transformers generate (batch {bs})", shared_jobs, [len(o) for o in outputs], seconds
                )
                res.notes.append(
                    f"static batches of {bs} in the same (shuffled) order; no KV reuse across batches"
                )
                reports["shared-prefix"].add(res)
            if convs:
                log(f"transformers generate: multi-turn, static batches of {bs} per turn")
                jobs, generated, seconds = static_multi_turn(model, convs, bs)
                res = make_result(f"transformers generate (batch {bs})", jobs, generated, seconds)
                res.notes.append(
                    f"turn by turn: all conversations' turn k in static batches of {bs}, then turn k+1; "
                    "the whole history is recomputed each turn"
                )
                reports["multi-turn"].add(res)
        if not opts.skip_generate_batch:
            if shared_jobs:
                log("transformers continuous batching: shared-prefix")
                cb = hf.ContinuousBatching(
                    model,
                    max_prompt_len=max(len(p) for p, _ in shared_jobs),
                    max_new_tokens=opts.output_len,
                    max_concurrent=len(shared_jobs),
                    options=opts.cb,
                )
                results, seconds = cb.run({f"r{i}": j for i, j in enumerate(shared_jobs)}, warmup=warmup)
                res = make_result(
                    GENERATE_BATCH,
                    shared_jobs,
                    [len(results[f"r{i}"]) for i in range(len(shared_jobs))],
                    seconds,
                )
                res.extra.update(cb.describe())
                res.notes.append(
                    "all requests submitted at once; transformers' prefix block sharing on (default); "
                    f"max_batch_tokens={cb.cb_config.max_batch_tokens}, num_blocks={cb.cb_config.num_blocks}"
                )
                reports["shared-prefix"].add(res)
            if convs:
                log("transformers continuous batching: multi-turn")
                jobs, generated, seconds, settings = continuous_multi_turn(model, convs, opts.cb, warmup)
                res = make_result(GENERATE_BATCH, jobs, generated, seconds, extra=settings)
                res.notes.append(
                    "each conversation's next turn is submitted when its previous turn finishes; "
                    f"max_batch_tokens={settings['cb_max_batch_tokens']}, num_blocks={settings['cb_num_blocks']}"
                )
                reports["multi-turn"].add(res)
        del model

    if opts.vllm is not None:
        _run_vllm(reports, config, opts, warmup, shared_jobs, convs, reference, log)
    for report in reports.values():
        _add_headlines(report)
    return list(reports.values())


def _run_vllm(
    reports: dict[str, BenchReport],
    config: EngineConfig,
    opts: PrefixOptions,
    warmup: list[Job],
    shared_jobs: list[Job],
    convs: list[Conversation],
    reference: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    """Both workloads in one vLLM process (one start-up); a failure leaves every other row in place."""
    runs = []
    if shared_jobs:
        runs.append(vb.batch_run("shared-prefix", shared_jobs))
    if convs:
        runs.append(vb.multi_turn_run("multi-turn", convs))
    try:
        result = vb.run_job(config.model_path, config.dtype, opts.seed, opts.vllm, warmup, runs, log)
        block = result.get("settings", {}).get("block_size", "?")
        cache_note = (
            f"vLLM's prefix cache reuses whole KV blocks ({block} tokens) and is reset between the workloads; "
            "radixlm's radix cache matches to the token"
        )
        if shared_jobs:
            res = vb.batch_result(
                result,
                "shared-prefix",
                shared_jobs,
                reference.get("shared-prefix"),
                config.dtype,
                how="one LLM.generate over the same shuffled requests, as token ids",
            )
            res.notes.append(cache_note)
            reports["shared-prefix"].add(res)
        if convs:
            res = vb.multi_turn_result(result, "multi-turn", convs, reference.get("multi-turn"), config.dtype)
            res.notes.append(cache_note)
            reports["multi-turn"].add(res)
    except vb.VllmError as e:
        vb.report_failure(list(reports.values()), e, log)


def _add_headlines(report: BenchReport) -> None:
    ref = report.reference()
    if ref is None:
        return
    report.headlines.append(
        f"radixlm cache hit rate: {100 * ref.extra.get('cache_hit_rate', 0.0):.1f}% of prompt tokens"
    )
    for r in report.results:
        if r is ref:
            continue
        ratio = report.ratio(r)
        if ratio is not None:
            report.headlines.append(f"radixlm vs {r.system}: {ratio:.2f}x")
