"""`radixlm bench overhead`: per-step host time against forward time, before and after, in one run.

    radixlm bench overhead --baseline-commit 6085f65 --json /tmp/overhead.json
    radixlm bench overhead --models tiny --batch-sizes 1,4 --steps 3          # this tree only

What one decode step costs outside the model's forward pass decides speed on a GPU, where the forward
of a small batch takes a millisecond or two. For each model and decode batch size B, an EngineCore is
built inline (no process, no sockets), B greedy requests with short random prompts are added, the core
steps until every request is decoding, and then K decode steps are timed. Per step:

  step            wall time of core.step()
  forward         inside model.forward + model.compute_logits (CUDA: synchronized on both sides)
  schedule, build_inputs, sampling_batch, sample, process_outputs, commit
                  time inside the core's methods of those names where they exist (see PHASES), each
                  excluding the phases it calls; "other" is the rest of the step
  ipc             msgpack encode + decode of that step's StepOutputs with the tree's own codec
                  (measured outside the timed step; socket time is not included)
  host            step - forward + ipc: what the front and the core spend per step besides the model

Every figure is the median over the K steps, in ms (host is the median of per-step sums, so phase
medians need not add up to it).

"Before" is another tree (`--baseline-tree`, or `--baseline-commit REV` exported with git archive into a
temp dir and removed afterwards) measured in the same run: each side runs as a subprocess
`python <this file> --worker SPEC` with PYTHONPATH=<tree> first, so that `import radixlm` is that tree.
Both sides get the same model folders (written by this tree's radixlm.testing), prompts and config,
and run alternately per (model, batch). The worker finds the core's layout by duck typing: the old one
(`radixlm.engine.core`, `add_request(rid, ids, params)`, `radixlm.engine.ipc`) or the new one
(`radixlm.core.engine_core`, `add_request(AddRequest)`, `radixlm.messages`).

This file imports only the standard library at module level, so it runs as a script under any tree.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPT = os.path.abspath(__file__)
THIS_TREE = str(Path(SCRIPT).resolve().parents[2])

# (phase, attribute path from the EngineCore, method). Only those that exist are wrapped; a method
# called inside another wrapped one is subtracted from its caller, so nesting never counts twice.
PHASES: tuple[tuple[str, str, str], ...] = (
    ("schedule", "scheduler", "schedule"),
    ("build_inputs", "runner", "build_forward_batch"),
    ("forward", "runner.model", "forward"),
    ("forward", "runner.model", "compute_logits"),
    ("sampling_batch", "runner", "build_sampling_batch"),
    ("sampling_batch", "SamplingBatch", "build"),  # the old core calls SamplingBatch.build itself
    ("sample", "", "_sample"),
    ("sample", "runner", "sample"),
    ("process_outputs", "", "_process_samples"),
    ("commit", "scheduler", "commit"),
)
HOST_PHASES = ("schedule", "build_inputs", "sampling_batch", "sample", "process_outputs", "commit")
# Table order: host phases, then the totals.
REPORTED = (*HOST_PHASES, "other", "ipc", "host", "forward", "step")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


# ---- the worker: one tree, one (model, batch) ----------------------------------------------------
class _PhaseTimer:
    """Exclusive time per phase: a wrapped call's time minus the wrapped calls made inside it."""

    def __init__(self) -> None:
        self._stack: list[int] = []
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.ns = {}
        self.calls = {}

    def wrap(self, phase: str, fn: Any, sync: Any = None) -> Any:
        clock = time.perf_counter_ns

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if sync is not None:
                sync()  # queued work before the phase is not the phase's
            self._stack.append(0)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                if sync is not None:
                    sync()
                elapsed = clock() - start
                inner = self._stack.pop()
                self.ns[phase] = self.ns.get(phase, 0) + elapsed - inner
                self.calls[phase] = self.calls.get(phase, 0) + 1
                if self._stack:
                    self._stack[-1] += elapsed

        return timed


def _resolve(core: Any, path: str) -> Any:
    if path == "SamplingBatch":
        # The class the core's own module calls (old layout: EngineCore._sample -> SamplingBatch.build).
        return getattr(sys.modules[type(core).__module__], "SamplingBatch", None)
    obj = core
    for name in filter(None, path.split(".")):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _instrument(core: Any, timer: _PhaseTimer, sync: Any) -> tuple[list[str], list[str]]:
    found, missing = [], []
    for phase, path, attr in PHASES:
        owner = _resolve(core, path)
        label = f"{path or 'core'}.{attr}"
        fn = getattr(owner, attr, None) if owner is not None else None
        if not callable(fn):
            missing.append(label)
            continue
        wrapped = timer.wrap(phase, fn, sync if phase == "forward" else None)
        # Instance attributes shadow the class's methods (nn.Module.__call__ looks up self.forward); a
        # class (SamplingBatch) gets a staticmethod around its bound classmethod.
        setattr(owner, attr, staticmethod(wrapped) if isinstance(owner, type) else wrapped)
        found.append(label)
    return found, missing


def _load_layout() -> dict[str, Any]:
    """EngineCore, how add_request is called, and the StepOutputs codec of the tree on sys.path."""
    try:
        from radixlm.core.engine_core import EngineCore

        layout = "new"
    except ModuleNotFoundError as exc:
        if exc.name not in ("radixlm.core", "radixlm.core.engine_core"):
            raise  # the new core exists but is broken: say so, do not fall back
        from radixlm.engine.core import EngineCore

        layout = "old"
    try:
        import radixlm.messages as codec

        if not hasattr(codec, "StepOutputs"):
            raise ImportError
    except ImportError:
        import radixlm.engine.ipc as codec
    from radixlm.config import EngineConfig

    params = [
        p
        for p in inspect.signature(EngineCore.add_request).parameters.values()
        if p.name != "self" and p.default is inspect.Parameter.empty and p.kind != p.KEYWORD_ONLY
    ]
    if len(params) == 1:  # add_request(AddRequest)
        import dataclasses

        from radixlm.messages import AddRequest

        fields = {f.name for f in dataclasses.fields(AddRequest)}

        def add(core: Any, rid: str, ids: list[int], sp: dict[str, Any]) -> None:
            key = {"rids": [rid]} if "rids" in fields else {"rid": rid}
            core.add_request(AddRequest(**key, input_ids=ids, sampling_params=sp))

        add_style = "add_request(AddRequest)"
    else:

        def add(core: Any, rid: str, ids: list[int], sp: dict[str, Any]) -> None:
            core.add_request(rid, ids, sp)

        add_style = "add_request(rid, input_ids, params)"
    return {
        "layout": layout,
        "EngineCore": EngineCore,
        "EngineConfig": EngineConfig,
        "codec": codec,
        "add": add,
        "add_style": add_style,
    }


def _config_fields(cls: Any) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


def _prompts(seed: int, batch: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed * 1_000_003 + batch)
    # Ids 3 and up: the test tokenizers' special tokens are 0-2.
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(batch)]


def _step_outputs(result: Any) -> list[Any]:
    return list(getattr(result, "outputs", result) or [])


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the core of the tree on sys.path, reach steady decode at spec["batch"], time spec["steps"] steps."""
    import torch

    import radixlm

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    lay = _load_layout()
    batch, steps, warmup = int(spec["batch"]), int(spec["steps"]), int(spec["warmup_steps"])
    lo, hi = int(spec["prompt_min"]), int(spec["prompt_max"])
    # Requests admitted first decode while the later prompts prefill (a chunk per step): a margin of 64
    # such steps keeps every request running through the timed steps.
    max_new = 1 + warmup + steps + 64
    options = {
        "model_path": spec["model_path"],
        "dtype": spec["dtype"],
        "device": spec["device"],
        "random_seed": 0,
        "log_level": "warning",
        "max_running_requests": batch,
        # Room for every request at once, and no more: the default (a fraction of RAM) would allocate
        # gigabytes for the tiny model, and both sides must get the same pool.
        "max_total_tokens": batch * (hi + max_new + 8) + 1024,
        "context_length": max(512, hi + max_new + 64),
    }
    known = _config_fields(lay["EngineConfig"])
    dropped = sorted(k for k in options if k not in known)
    core = lay["EngineCore"](lay["EngineConfig"](**{k: v for k, v in options.items() if k in known}))
    device = core.runner.device
    sync = torch.cuda.synchronize if getattr(device, "type", "cpu") == "cuda" else None
    timer = _PhaseTimer()
    found, missing = _instrument(core, timer, sync)

    vocab = min(int(core.runner.vocab_size), 2048)
    params = {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}
    rids = [f"r{i}" for i in range(batch)]
    for rid, ids in zip(rids, _prompts(int(spec["seed"]), batch, lo, hi, vocab)):
        lay["add"](core, rid, ids, dict(params))

    # Prefill (chunked as the core likes) until every request has its first token: then all decode.
    started: set[str] = set()
    prefill_steps = 0
    t0 = time.perf_counter()
    while len(started) < batch:
        if not core.has_work() or prefill_steps > 100_000:
            raise RuntimeError(f"only {len(started)} of {batch} requests started decoding")
        for out in _step_outputs(core.step()):
            if out.new_token_ids:
                started.add(out.rid)
        prefill_steps += 1
    prefill_s = time.perf_counter() - t0
    for _ in range(warmup):
        core.step()

    codec = lay["codec"]
    clock = time.perf_counter_ns
    per_step: dict[str, list[float]] = {k: [] for k in ("step", "ipc", *HOST_PHASES, "forward", "other")}
    outputs_per_step, tokens_per_step, ipc_bytes = [], [], []
    calls: dict[str, list[int]] = {}
    for _ in range(steps):
        timer.reset()
        if sync is not None:
            sync()
        start = clock()
        outs = _step_outputs(core.step())
        if sync is not None:
            sync()
        step_ns = clock() - start
        start = clock()
        data = codec.encode(codec.StepOutputs(outputs=outs))
        back = codec.decode(data)
        ipc_ns = clock() - start
        if len(back.outputs) != len(outs):
            raise RuntimeError("the StepOutputs codec lost outputs")
        ipc_bytes.append(len(data))
        outputs_per_step.append(len(outs))
        tokens_per_step.append(sum(len(o.new_token_ids) for o in outs))
        phase_ns = {p: timer.ns.get(p, 0) for p in (*HOST_PHASES, "forward")}
        for p, n in timer.calls.items():
            calls.setdefault(p, []).append(n)
        per_step["step"].append(step_ns / 1e6)
        per_step["ipc"].append(ipc_ns / 1e6)
        for p, ns in phase_ns.items():
            per_step[p].append(ns / 1e6)
        per_step["other"].append((step_ns - sum(phase_ns.values())) / 1e6)
    per_step["host"] = [s - f + i for s, f, i in zip(per_step["step"], per_step["forward"], per_step["ipc"])]
    foreign = _foreign_modules(os.path.dirname(radixlm.__file__))
    if foreign:
        raise RuntimeError(f"modules from outside {os.path.dirname(radixlm.__file__)}: {foreign}")
    # A phase whose method exists but was never called (a plain greedy step builds no sampling batch)
    # measured 0; one with no such method in this tree is None: its time, if any, is in "other".
    wrapped_phases = {ph for ph, path, attr in PHASES if f"{path or 'core'}.{attr}" in found}
    median = {k: statistics.median(v) for k, v in per_step.items()}
    for p in (*HOST_PHASES, "forward"):
        if p not in wrapped_phases:
            median[p] = None
    return {
        "layout": lay["layout"],
        "add_request": lay["add_style"],
        "codec": lay["codec"].__name__,
        "radixlm_file": radixlm.__file__,
        "model_path": spec["model_path"],
        "batch": batch,
        "steps": steps,
        "warmup_steps": warmup,
        "device": str(device),
        "dtype": str(getattr(core.runner, "dtype", spec["dtype"])).removeprefix("torch."),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "config": {k: v for k, v in options.items() if k in known},
        "config_dropped": dropped,
        "wrapped": found,
        "not_found": missing,
        "phase_calls_per_step": {p: statistics.median(n) for p, n in calls.items()},
        "prefill_steps": prefill_steps,
        "prefill_s": prefill_s,
        "outputs_per_step": outputs_per_step,
        "tokens_per_step": tokens_per_step,
        "all_decode": all(n == batch for n in outputs_per_step) and all(n == batch for n in tokens_per_step),
        "ipc_bytes": statistics.median(ipc_bytes),
        "median_ms": median,
        "per_step_ms": per_step,
    }


def _only_pythonpath_radixlm() -> None:
    """Drop setuptools' editable-install finders: with `pip install -e` of another checkout, they resolve
    a subpackage the tree on PYTHONPATH lacks (radixlm.core in an old tree) to that checkout's copy."""

    def editable(obj: Any) -> bool:
        return str(getattr(obj, "__module__", "") or "").startswith("__editable__")

    sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
    sys.path_importer_cache.clear()


def _foreign_modules(tree_pkg: str) -> list[str]:
    """radixlm modules loaded from outside the package folder `tree_pkg`."""
    root = os.path.realpath(tree_pkg) + os.sep
    return sorted(
        name
        for name, mod in list(sys.modules.items())
        if (name == "radixlm" or name.startswith("radixlm."))
        and getattr(mod, "__file__", None)
        and not os.path.realpath(mod.__file__).startswith(root)
    )


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    _only_pythonpath_radixlm()
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
        result = run_worker(spec)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return 0


# ---- the parent: model folders, trees, alternation, the table ------------------------------------
def cpu_bf16_flags() -> list[str]:
    """Which of the CPU's flags make bf16 fast (avx512_bf16, amx_bf16); [] on AVX2-only CPUs."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in BF16_CPU_FLAGS if f in flags]
    return []


def _cpu_vector_isa() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            for isa in ("amx_bf16", "avx512_bf16", "avx512f", "avx2"):
                if isa in flags:
                    return isa
            return "no avx2"
    return "unknown"


def default_dtype(device: str) -> tuple[str, str]:
    """(dtype, why): bf16 on CUDA and on CPUs with bf16 instructions, else float32."""
    if device.startswith("cuda"):
        return "bfloat16", "CUDA"
    if device == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                return "bfloat16", "CUDA"
        except ImportError:
            pass
    flags = cpu_bf16_flags()
    if flags:
        return "bfloat16", f"the CPU has {', '.join(flags)}"
    return (
        "float32",
        f"the CPU has no {'/'.join(BF16_CPU_FLAGS)} (best: {_cpu_vector_isa()}): bf16 is emulated",
    )


def _git(repo: str, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", repo, *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def _describe(tree: str) -> str:
    try:
        return _git(tree, "describe", "--always", "--dirty", "--abbrev=12")
    except (OSError, subprocess.SubprocessError):
        return "no git"


def export_commit(rev: str, dest: str, repo: str = THIS_TREE) -> str:
    """Write the files of commit `rev` into `dest` (git archive: no worktree to clean up); returns its sha."""
    sha = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
    data = subprocess.run(
        ["git", "-C", repo, "archive", "--format=tar", sha], capture_output=True, check=True, timeout=300
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(dest)  # noqa: S202 - our own repository's archive
    return sha


def run_side(tree: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One worker subprocess with `tree` first on PYTHONPATH; its JSON result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, SCRIPT, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"overhead worker for {tree} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        raise RuntimeError(f"overhead worker for {tree} failed (exit {proc.returncode}):\n{tail}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    result = json.loads(lines[-1])
    expected = os.path.realpath(os.path.join(tree, "radixlm"))
    if not os.path.realpath(result["radixlm_file"]).startswith(expected + os.sep):
        raise RuntimeError(f"the worker imported {result['radixlm_file']}, not the tree {tree}")
    return result


def _model_folder(name: str, arch: str) -> str:
    if os.path.isdir(name):
        return name
    from radixlm.testing import cached_model_folder

    return str(cached_model_folder(arch, name))


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _speedup(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or after <= 0:
        return None
    return before / after


class OverheadReport:
    """What `radixlm bench overhead` measured: `table()` to print, `to_dict()` for --json."""

    def __init__(self, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
        self.meta = meta
        self.results = results

    @property
    def has_baseline(self) -> bool:
        return any("before" in r for r in self.results)

    def table(self) -> str:
        m = self.meta
        lines = ["== radixlm bench overhead =="]
        after = f"after: {m['after']['tree']} ({m['after']['describe']})"
        if self.has_baseline:
            lines.append(f"before: {m['before']['tree']} ({m['before']['describe']}); {after}")
        else:
            lines.append(after + "; no baseline (--baseline-commit REV or --baseline-tree PATH)")
        lines.append(
            f"device {m['device']}, dtype {m['dtype']} ({m['dtype_reason']}), torch threads "
            f"{m['torch_threads']}, {m['steps']} timed decode steps after {m['warmup_steps']} warm-up, "
            f"prompts {m['prompt_min']}-{m['prompt_max']} tokens, greedy"
        )
        header = ["model", "batch", "phase"]
        header += ["before ms", "after ms", "speedup"] if self.has_baseline else ["ms"]
        rows = []
        for r in self.results:
            a = r["after"]["median_ms"]
            b = r["before"]["median_ms"] if "before" in r else None
            for phase in REPORTED:
                row = [r["model"], str(r["batch"]), phase]
                if b is not None:
                    s = _speedup(b.get(phase), a.get(phase))
                    row += [_fmt(b.get(phase)), _fmt(a.get(phase)), "-" if s is None else f"{s:.2f}x"]
                else:
                    row.append(_fmt(a.get(phase)))
                rows.append(row)
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]

        def fmt(cells: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        lines += [fmt(header), "  ".join("-" * w for w in widths)]
        prev = None
        for row in rows:
            if prev is not None and row[:2] != prev:
                lines.append("")
            lines.append(fmt(row))
            prev = row[:2]
        lines.append(
            "medians over the timed steps, in ms; host = step - forward + ipc; other = step - forward - the "
            "named phases; '-': that tree has no such method (its time is in other); speedup = before/after"
        )
        lines += self.headlines()
        return "\n".join(lines)

    def headlines(self) -> list[str]:
        out = []
        for r in self.results:
            a = r["after"]["median_ms"]
            tag = f"{r['model']} batch {r['batch']}"
            if "before" in r:
                b = r["before"]["median_ms"]
                s = _speedup(b["host"], a["host"])
                verdict = "met" if s is not None and s >= 2 else "NOT met"
                less = "-" if s is None else f"{s:.2f}x"
                out.append(
                    f"{tag}: host {_fmt(b['host'])} -> {_fmt(a['host'])} ms/step (before/after {less}; target "
                    f">= 2x: {verdict}); forward {_fmt(b['forward'])} -> {_fmt(a['forward'])} ms"
                )
            else:
                share = a["host"] / a["step"] if a["step"] else 0.0
                out.append(f"{tag}: host {_fmt(a['host'])} ms/step, {100 * share:.0f}% of the step")
            for side in ("before", "after"):
                if side in r and not r[side]["all_decode"]:
                    out.append(f"  [{side}] (!) not every timed step decoded all {r['batch']} requests")
                if side in r and r[side]["config_dropped"]:
                    dropped = ", ".join(r[side]["config_dropped"])
                    out.append(f"  [{side}] (!) EngineConfig has no {dropped}: that tree used its defaults")
                if side in r and r[side]["median_ms"].get("forward") is None:
                    out.append(f"  [{side}] (!) model.forward was never called: host time includes forward")
        for side in ("before", "after"):
            missing = self.meta.get(side, {}).get("not_found")
            if missing:
                out.append(f"[{side}] not found (time counted in other): {', '.join(missing)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": "overhead", **self.meta, "results": self.results}


def add_overhead_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        default="tiny,small",
        help="comma-separated radixlm.testing sizes (or model folders) (default: tiny,small)",
    )
    parser.add_argument("--arch", default="qwen2", help="radixlm.testing architecture (default: qwen2)")
    parser.add_argument(
        "--batch-sizes", default="1,64,256", help="comma-separated decode batch sizes (default: 1,64,256)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps (default: 20)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps first (default: 3)")
    parser.add_argument("--prompt-min", type=int, default=16, help="shortest random prompt (default: 16)")
    parser.add_argument("--prompt-max", type=int, default=32, help="longest random prompt (default: 32)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: bfloat16 on CUDA or on CPUs with avx512_bf16/amx_bf16, else float32",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each worker")
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--baseline-tree", metavar="PATH", help="a radixlm source tree to measure as 'before'")
    base.add_argument(
        "--baseline-commit",
        metavar="REV",
        help="a commit of this repository to measure as 'before' (exported to a temp dir)",
    )
    parser.add_argument(
        "--after-tree",
        metavar="PATH",
        default=THIS_TREE,
        help="the tree measured as 'after' (default: this one)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker (default: 1800)")


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(
            f"radixlm bench overhead: {name} must be comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise SystemExit(f"radixlm bench overhead: {name} must be positive, got {text!r}")
    return values


def run_overhead_from_args(ns: argparse.Namespace) -> OverheadReport:
    batches = _ints(ns.batch_sizes, "--batch-sizes")
    if ns.steps < 1 or ns.warmup_steps < 0 or not 1 <= ns.prompt_min <= ns.prompt_max:
        raise SystemExit(
            "radixlm bench overhead: need --steps >= 1, --warmup-steps >= 0, 1 <= --prompt-min <= --prompt-max"
        )
    models = [m.strip() for m in ns.models.split(",") if m.strip()]
    dtype, why = (ns.dtype, "--dtype") if ns.dtype != "auto" else default_dtype(ns.device)
    print(f"[overhead] dtype {dtype}: {why}", file=sys.stderr)
    folders = {m: _model_folder(m, ns.arch) for m in models}
    tmp = None
    try:
        sides: dict[str, dict[str, Any]] = {
            "after": {"tree": os.path.abspath(ns.after_tree), "describe": _describe(ns.after_tree)}
        }
        if ns.baseline_commit:
            tmp = tempfile.mkdtemp(prefix="radixlm-overhead-base.")
            sha = export_commit(ns.baseline_commit, tmp)
            sides["before"] = {"tree": tmp, "describe": f"commit {sha[:12]} ({ns.baseline_commit})"}
        elif ns.baseline_tree:
            sides["before"] = {
                "tree": os.path.abspath(ns.baseline_tree),
                "describe": _describe(ns.baseline_tree),
            }
        results = []
        for i, (model, batch) in enumerate((m, b) for m in models for b in batches):
            spec = {
                "model_path": folders[model],
                "batch": batch,
                "steps": ns.steps,
                "warmup_steps": ns.warmup_steps,
                "prompt_min": ns.prompt_min,
                "prompt_max": ns.prompt_max,
                "dtype": dtype,
                "device": ns.device,
                "threads": ns.threads,
                "seed": ns.seed,
            }
            row: dict[str, Any] = {"model": model, "batch": batch}
            order = [s for s in ("before", "after") if s in sides]
            if i % 2:
                order.reverse()  # alternate who goes first, so drift does not favour one side
            for side in order:
                start = time.perf_counter()
                res = run_side(sides[side]["tree"], spec, ns.timeout)
                row[side] = res
                for key in ("layout", "wrapped", "not_found", "torch_threads"):
                    sides[side].setdefault(key, res[key])
                med = res["median_ms"]
                print(
                    f"[overhead] {model} batch {batch} {side} ({res['layout']} layout): host "
                    f"{_fmt(med['host'])} ms, forward {_fmt(med['forward'])} ms, step {_fmt(med['step'])} ms "
                    f"({time.perf_counter() - start:.1f} s)",
                    file=sys.stderr,
                )
            results.append(row)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    threads = results[0]["after"]["torch_threads"] if results else None
    device = results[0]["after"]["device"] if results else ns.device
    meta = {
        "before": sides.get("before", {}),
        "after": sides["after"],
        "models": {m: folders[m] for m in models},
        "arch": ns.arch,
        "batch_sizes": batches,
        "steps": ns.steps,
        "warmup_steps": ns.warmup_steps,
        "prompt_min": ns.prompt_min,
        "prompt_max": ns.prompt_max,
        "dtype": dtype,
        "dtype_reason": why,
        "device": device,
        "torch_threads": threads,
        "cpu_bf16_flags": cpu_bf16_flags(),
        "environment": _environment(",".join(folders.values()), dtype),
    }
    return OverheadReport(meta, results)


def _environment(model_path: str, dtype: str) -> dict[str, Any]:
    try:
        from radixlm.bench.report import environment

        return environment(model_path, dtype)
    except Exception as exc:  # the report module of another tree may differ; the run still counts
        return {"error": f"environment(): {exc!r}", "command": " ".join(sys.argv)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixlm bench overhead", description=__doc__.split("\n\n")[0])
    add_overhead_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="prompt seed (default: 0)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    report = run_overhead_from_args(ns)
    print(report.table())
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
            f.write("\n")
        print(f"\nresults written to {ns.json}")
    return 0


if __name__ == "__main__":
    # Run as a script: this folder (radixlm/bench) is sys.path[0]; its module names (cli, common, report)
    # must not shadow anything, and `import radixlm` must come from PYTHONPATH (the tree being measured).
    here = os.path.dirname(SCRIPT)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(_worker_main(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
