"""vLLM as an optional baseline of `radixlm bench offline` and `radixlm bench prefix` (`--vllm-python PATH`).

vLLM lives in its own environment (its wheel pins its own transformers), so it runs as a separate process:
PATH is that environment's python, which runs radixlm/bench/vllm_worker.py on a JSON job file written here
(the same prompt token ids, per-request max_new_tokens, warmup requests and seed as radixlm's run) and
writes a JSON result file read back here (per-request output token ids, seconds, cached tokens, vLLM's
version and start-up time). The protocol is described in vllm_worker.py.

What vLLM runs: `vllm.LLM(model, dtype, seed, enable_prefix_caching=True, max_model_len=the longest
request of the job, plus --vllm-max-num-seqs / --vllm-max-num-batched-tokens when given)`; the warmup
requests once, then the prefix cache is reset; each timed run is greedy, ignore_eos, exactly
max_new_tokens per request. Start-up (minutes on a CPU) is reported apart and never timed.

One vLLM start-up serves every workload of a bench run. A failing worker (no such python, vLLM not
importable, a crash, a time-out) becomes a `VllmError` naming the python and the tail of the worker's
output; the benchmarks turn it into a headline, and the other systems' results are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixlm.bench.common import make_result
from radixlm.bench.report import BenchReport, SystemResult

WORKER = Path(__file__).with_name("vllm_worker.py")
PROTOCOL = 1
SYSTEM = "vLLM"  # row names: "vLLM <version>"
ENV_PYTHON = "RADIXLM_VLLM_PYTHON"
TAIL_LINES = 30
DEFAULT_KV_CACHE_GIB = 4.0
_OMP_CORES = re.compile(r"core ids=(\[[^\]]*\])")  # vLLM's CPU worker logs where its threads run
_ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b: ")

Job = tuple[list[int], int]


class VllmError(RuntimeError):
    """The vLLM worker did not produce a result."""


@dataclass
class VllmOptions:
    python: str
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # vLLM's KV cache (kv_cache_memory_bytes). Always set: without it vLLM's CPU worker reserves a fraction
    # of the NUMA node's memory (gpu_memory_utilization, 0.92 by default) and refuses to start if that much
    # is not free.
    kv_cache_gib: float = DEFAULT_KV_CACHE_GIB
    omp_threads_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0-15" (default: vLLM's "auto")
    timeout_s: float = 3600.0
    log_path: str | None = None  # keep the worker's output here (default: a temp file, kept on failure)


# ---- command line ----


def add_shared_vllm_args(group: Any, python_help: str, server: bool = False) -> None:
    """The flags the offline baseline and bench serving's vLLM server share, named alike: vLLM's engine
    options, spelled as vLLM's LLM(...) keyword (offline) or its api_server flag (`server`)."""

    def spelled(name: str) -> str:
        return "--" + name.replace("_", "-") if server else name

    group.add_argument("--vllm-python", metavar="PATH", default=None, help=python_help)
    group.add_argument(
        "--vllm-max-num-seqs", type=int, default=None, help=f"vLLM {spelled('max_num_seqs')} (default: vLLM's)"
    )
    group.add_argument(
        "--vllm-max-num-batched-tokens",
        type=int,
        default=None,
        help=f"vLLM {spelled('max_num_batched_tokens')} (default: vLLM's)",
    )
    group.add_argument(
        "--vllm-kv-cache-gib",
        type=float,
        default=DEFAULT_KV_CACHE_GIB,
        help=f"vLLM's KV cache in GiB ({spelled('kv_cache_memory_bytes')}; default: {DEFAULT_KV_CACHE_GIB:g}). "
        "Always set: without it vLLM's CPU worker reserves most of the machine's memory",
    )
    group.add_argument(
        "--vllm-omp-threads-bind",
        metavar="CORES",
        default=None,
        help="VLLM_CPU_OMP_THREADS_BIND for vLLM's CPU worker, e.g. 0-1 (default: vLLM's 'auto', which "
        "keeps one core for vLLM's front end)",
    )


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM baseline (optional, runs in its own process)")
    add_shared_vllm_args(
        group,
        "python of an environment with vLLM installed (e.g. /work/vllm-venv/bin/python): adds a vLLM "
        "row, run on the same token ids with prefix caching on (default: no vLLM row)",
    )
    group.add_argument(
        "--vllm-timeout",
        type=float,
        default=3600.0,
        help="seconds the vLLM worker may take, start-up included (default: 3600)",
    )
    group.add_argument("--vllm-log", metavar="PATH", default=None, help="write the vLLM worker's output here")


def options_from_args(ns: argparse.Namespace) -> VllmOptions | None:
    if not getattr(ns, "vllm_python", None):
        return None
    return VllmOptions(
        python=ns.vllm_python,
        max_num_seqs=ns.vllm_max_num_seqs,
        max_num_batched_tokens=ns.vllm_max_num_batched_tokens,
        kv_cache_gib=ns.vllm_kv_cache_gib,
        omp_threads_bind=ns.vllm_omp_threads_bind,
        timeout_s=ns.vllm_timeout,
        log_path=ns.vllm_log,
    )


# ---- the job and the worker ----


def batch_run(name: str, jobs: Sequence[Job]) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "batch",
        "requests": [{"prompt": list(p), "max_tokens": n} for p, n in jobs],
    }


def multi_turn_run(name: str, convs: Sequence[Any]) -> dict[str, Any]:
    """`convs`: radixlm.bench.workloads.Conversation (first_prompt, followups, output_len, num_turns)."""
    return {
        "name": name,
        "kind": "multi_turn",
        "conversations": [
            {
                "first_prompt": list(c.first_prompt),
                "followups": [list(f) for f in c.followups],
                "output_len": c.output_len,
                "num_turns": c.num_turns,
            }
            for c in convs
        ],
    }


def _longest(runs: Sequence[dict[str, Any]], warmup: Sequence[Job]) -> int:
    need = [len(p) + n for p, n in warmup]
    for run in runs:
        if run["kind"] == "batch":
            need += [len(r["prompt"]) + r["max_tokens"] for r in run["requests"]]
        else:
            for c in run["conversations"]:
                need.append(
                    len(c["first_prompt"])
                    + sum(len(f) for f in c["followups"])
                    + c["num_turns"] * c["output_len"]
                )
    return max(need)


def build_job(
    model_path: str,
    dtype: str,
    seed: int,
    opts: VllmOptions,
    warmup: Sequence[Job],
    runs: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    engine_args: dict[str, Any] = {
        "max_model_len": _longest(runs, warmup),
        "kv_cache_memory_bytes": int(opts.kv_cache_gib * 2**30),
    }
    if opts.max_num_seqs is not None:
        engine_args["max_num_seqs"] = opts.max_num_seqs
    if opts.max_num_batched_tokens is not None:
        engine_args["max_num_batched_tokens"] = opts.max_num_batched_tokens
    return {
        "protocol": PROTOCOL,
        "model": str(Path(model_path).resolve()),
        "dtype": dtype,
        "seed": seed,
        "enable_prefix_caching": True,
        "engine_args": engine_args,
        "warmup": [{"prompt": list(p), "max_tokens": n} for p, n in warmup],
        "runs": list(runs),
    }


def worker_env(opts: VllmOptions) -> dict[str, str]:
    """radixlm's environment minus what would leak radixlm's packages into vLLM's interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never look anything up
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if opts.omp_threads_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = opts.omp_threads_bind
    return env


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The first few error lines of the worker's output (vLLM logs a root cause from its engine process
    long before the final traceback), then its last `lines` lines."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "    (no output)"
    all_lines = text.rstrip().splitlines()
    if not all_lines:
        return "    (no output)"
    errors: list[str] = []
    for line in all_lines[:-lines]:
        if _ERROR_LINE.search(line) and line not in errors:
            errors.append(line)
    shown = errors[:3] + (["    ..."] if errors else []) + all_lines[-lines:]
    return "\n".join("    " + line for line in shown)


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the worker and every process it started (they share its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    proc.wait()


def run_worker(
    job: dict[str, Any], opts: VllmOptions, log: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Run the worker on `job` under `opts.python`; its result, or VllmError naming the python and the log tail."""
    python = opts.python
    resolved = shutil.which(python) if os.sep not in python else python
    if resolved is None or not os.path.isfile(resolved) or not os.access(resolved, os.X_OK):
        raise VllmError(f"--vllm-python {python}: no such executable")
    workdir = Path(tempfile.mkdtemp(prefix="radixlm-vllm-"))
    job_path, result_path = workdir / "job.json", workdir / "result.json"
    log_path = Path(opts.log_path) if opts.log_path else workdir / "worker.log"
    job_path.write_text(json.dumps(job))
    cmd = [resolved, str(WORKER), str(job_path), str(result_path)]
    log(f"vLLM: {resolved} {WORKER.name} (start-up can take minutes); output in {log_path}")
    start = time.perf_counter()
    failed = True
    try:
        with open(log_path, "wb") as out:
            try:
                # Its own process group: vLLM starts engine and worker processes, and a time-out or a
                # Ctrl-C here must stop all of them, not just the worker.
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=worker_env(opts), start_new_session=True,
                )  # fmt: skip
            except OSError as e:
                raise VllmError(f"--vllm-python {python}: could not start it: {e}") from None
            try:
                proc.wait(timeout=opts.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise VllmError(
                    f"vLLM worker ({python}) ran past --vllm-timeout {opts.timeout_s:g}s; "
                    f"last output ({log_path}):\n{_tail(log_path)}"
                ) from None
            except BaseException:
                _kill_group(proc)
                raise
        result: dict[str, Any] | None = None
        if result_path.exists():
            try:
                result = json.loads(result_path.read_text())
            except ValueError:
                result = None
        if not isinstance(result, dict) or not result.get("ok"):
            why = (
                result.get("error", "failed")
                if isinstance(result, dict)
                else f"exit status {proc.returncode}, no result"
            )
            raise VllmError(
                f"vLLM worker ({python}) failed: {why}; job {job_path}; last output ({log_path}):\n"
                + _tail(log_path)
            )
        if result.get("protocol") != PROTOCOL:
            raise VllmError(
                f"vLLM worker ({python}) answered protocol {result.get('protocol')!r}, expected {PROTOCOL}"
            )
        names = [r["name"] for r in job["runs"]]
        if [r.get("name") for r in result.get("runs", [])] != names:
            raise VllmError(
                f"vLLM worker ({python}) returned runs {[r.get('name') for r in result.get('runs', [])]}, expected {names}"
            )
        failed = False
        result["python_path"] = python
        cores = _OMP_CORES.search(log_path.read_text(errors="replace"))
        if cores:
            result["omp_core_ids"] = cores.group(1)
        result["wall_seconds"] = time.perf_counter() - start
        return result
    finally:
        if failed:  # keep the job (and the log) to rerun the worker by hand
            result_path.unlink(missing_ok=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# ---- results ----


def system_name(result: dict[str, Any]) -> str:
    return f"{SYSTEM} {result.get('vllm_version', '')}".strip()


def is_vllm(result: SystemResult) -> bool:
    return result.system.split()[0] == SYSTEM


def _identical(pairs: Sequence[tuple[list[int] | None, list[int], int]]) -> int:
    """How many (reference ids, vLLM ids, requested) agree on every requested token."""
    return sum(1 for ref, got, n in pairs if ref is not None and list(ref[:n]) == list(got[:n]))


def _identity_note(identical: int, total: int, dtype: str, extra: str = "") -> str:
    note = f"greedy tokens identical to radixlm's for {identical} of {total} requests{extra}"
    if identical < total and dtype != "float32":
        note += (
            f" (in {dtype} the two engines' kernels round differently, so a near-tie logit can go either "
            "way; run with --dtype float32 to compare tokens)"
        )
    return note


def _common_notes(result: dict[str, Any], how: str) -> list[str]:
    s = result.get("settings", {})
    shown = ", ".join(
        f"{k}={s[k]}"
        for k in ("dtype", "max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len")
        if k in s
    )
    return [
        f"vLLM {result.get('vllm_version')} in its own process ({result.get('python_path', 'its python')}); "
        f"{how}; greedy, ignore_eos, prefix caching on" + (f"; {shown}" if shown else ""),
        f"start-up {result.get('startup_seconds', 0):.1f}s and warmup {result.get('warmup_seconds', 0):.1f}s, "
        "not counted in seconds"
        + (
            f"; its CPU worker's OpenMP threads ran on cores {result['omp_core_ids']}"
            if "omp_core_ids" in result
            else ""
        ),
    ]


def _cache_extra(outputs: Sequence[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
    cached = [o.get("num_cached_tokens") for o in outputs]
    if not cached or any(c is None for c in cached):
        return {}
    total = sum(cached)
    return {"cached_tokens": total, "cache_hit_rate": total / prompt_tokens if prompt_tokens else 0.0}


def _extra(result: dict[str, Any], outputs: Sequence[dict[str, Any]], jobs: Sequence[Job]) -> dict[str, Any]:
    return {
        "vllm_version": result.get("vllm_version"),
        "startup_seconds": result.get("startup_seconds"),
        "vllm_settings": {k: v for k, v in result.get("settings", {}).items() if k != "env"},
        **_cache_extra(outputs, sum(len(p) for p, _ in jobs)),
    }


def _run(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in result["runs"] if r["name"] == name)


def batch_result(
    result: dict[str, Any],
    name: str,
    jobs: Sequence[Job],
    reference: Sequence[list[int]] | None,
    dtype: str,
    how: str = "one LLM.generate over all requests, given as token ids",
) -> SystemResult:
    """The SystemResult of a batch run; `reference`: radixlm's output ids per request, in the same order."""
    run = _run(result, name)
    outputs = run["outputs"]
    if len(outputs) != len(jobs):
        raise VllmError(f"vLLM worker returned {len(outputs)} outputs for {len(jobs)} requests in {name!r}")
    res = make_result(
        system_name(result),
        jobs,
        [len(o["token_ids"]) for o in outputs],
        run["seconds"],
        notes=_common_notes(result, how),
        extra=_extra(result, outputs, jobs),
    )
    if reference is not None:
        same = _identical([(ref, o["token_ids"], n) for ref, o, (_, n) in zip(reference, outputs, jobs)])
        res.extra.update(identical_to_radixlm=same, compared_with_radixlm=len(jobs))
        res.notes.append(_identity_note(same, len(jobs), dtype))
    return res


def multi_turn_result(
    result: dict[str, Any],
    name: str,
    convs: Sequence[Any],
    reference: dict[tuple[int, ...], list[int]] | None,
    dtype: str,
) -> SystemResult:
    """The SystemResult of a multi-turn run. vLLM builds each next turn from its own output, so a turn is
    compared with the radixlm request that had the same prompt; once an earlier turn differs, the later
    prompts differ and count as not identical."""
    run = _run(result, name)
    outputs = run["outputs"]
    jobs: list[Job] = [(o["prompt"], convs[int(o["key"].split("-")[0][1:])].output_len) for o in outputs]
    res = make_result(
        system_name(result),
        jobs,
        [len(o["token_ids"]) for o in outputs],
        run["seconds"],
        notes=_common_notes(
            result,
            f"{len(convs)} conversations through the LLM's engine (add_request/step): every first turn at "
            "once, each next turn (its own history) submitted when the previous one finishes",
        ),
        extra=_extra(result, outputs, jobs),
    )
    if reference is not None:
        pairs = [(reference.get(tuple(o["prompt"])), o["token_ids"], n) for o, (_, n) in zip(outputs, jobs)]
        same = _identical(pairs)
        diverged = sum(1 for ref, _, _ in pairs if ref is None)
        extra = (
            f" ({diverged} later turns had another history, an earlier turn having differed)"
            if diverged
            else ""
        )
        res.extra.update(identical_to_radixlm=same, compared_with_radixlm=len(jobs))
        res.notes.append(_identity_note(same, len(jobs), dtype, extra))
    return res


def run_job(
    model_path: str,
    dtype: str,
    seed: int,
    opts: VllmOptions,
    warmup: Sequence[Job],
    runs: Sequence[dict[str, Any]],
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """build_job + run_worker; raises VllmError."""
    result = run_worker(build_job(model_path, dtype, seed, opts, warmup, runs), opts, log)
    log(
        f"vLLM {result.get('vllm_version')}: start-up {result.get('startup_seconds', 0):.1f}s, "
        + ", ".join(f"{r['name']} {r['seconds']:.2f}s" for r in result["runs"])
    )
    return result


def report_failure(reports: Sequence[BenchReport], error: Exception, log: Callable[[str], None]) -> None:
    """Keep the other systems' rows; say in every report (and on stderr) that the vLLM row is missing."""
    message = f"vLLM baseline failed, no vLLM row: {error}"
    log(message)
    for report in reports:
        report.headlines.append(message)


def default_log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
