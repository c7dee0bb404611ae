"""`radixlm bench overhead`: the per-step phases are found and timed, in a worker under any tree.

Not a timed test: the tiny model, batch 1 and 4, two decode steps. It checks that every phase the
benchmark reports is measured in this tree's core (a rename in the core shows here, not as a silent
"other"), that times are positive and that every timed step decoded the whole batch.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from radixlm.bench import overhead
from radixlm.bench.cli import main as bench_main

REPO = pathlib.Path(overhead.THIS_TREE)
BASELINE = "6085f65"  # the core before the core/ kv/ messages rebuild: the old layout


def _check_side(side: dict, batch: int, steps: int) -> None:
    assert side["batch"] == batch and side["steps"] == steps
    assert side["all_decode"], side["outputs_per_step"]
    assert side["outputs_per_step"] == [batch] * steps
    med = side["median_ms"]
    assert set(overhead.REPORTED) <= set(med)
    for phase in ("step", "forward", "host", "ipc", "other"):
        assert med[phase] > 0, (phase, med)
    for phase in overhead.HOST_PHASES:
        # None means no method of a PHASES name exists in the core: update PHASES with the new name.
        assert med[phase] is not None, f"{phase} is not measured in this core; wrapped: {side['wrapped']}"
        # The bench's greedy decode steps are plain: they build no sampling batch (Sampler.argmax).
        assert med[phase] == 0 if phase == "sampling_batch" else med[phase] > 0, (phase, med)
    assert med["forward"] < med["step"]
    ps = side["per_step_ms"]
    assert ps["host"] == pytest.approx([s - f + i for s, f, i in zip(ps["step"], ps["forward"], ps["ipc"])])
    assert side["phase_calls_per_step"]["forward"] >= 1


def test_overhead_smoke(tmp_path: pathlib.Path, capsys) -> None:
    out = tmp_path / "overhead.json"
    argv = ["overhead", "--models", "tiny", "--batch-sizes", "1,4", "--steps", "2", "--warmup-steps", "1"]
    argv += ["--dtype", "float32", "--device", "cpu", "--json", str(out)]
    assert bench_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "overhead" and data["dtype"] == "float32"
    assert data["before"] == {} and data["after"]["tree"] == str(REPO)
    assert "radixlm" in data["environment"]
    assert [(r["model"], r["batch"]) for r in data["results"]] == [("tiny", 1), ("tiny", 4)]
    for r in data["results"]:
        assert "before" not in r
        _check_side(r["after"], r["batch"], 2)
        assert os.path.realpath(r["after"]["radixlm_file"]).startswith(str(REPO))
    printed = capsys.readouterr().out
    assert "== radixlm bench overhead ==" in printed
    for phase in overhead.REPORTED:
        assert f"tiny   4      {phase}" in printed
    assert "no baseline" in printed


def test_phase_timer_counts_nested_calls_once() -> None:
    timer = overhead._PhaseTimer()
    inner = timer.wrap("inner", lambda: time.sleep(0.02))

    def outer_fn() -> None:
        time.sleep(0.01)
        inner()

    outer = timer.wrap("outer", outer_fn)
    outer()
    assert timer.calls == {"inner": 1, "outer": 1}
    assert 0.015e9 < timer.ns["inner"] < 0.2e9
    assert 0.005e9 < timer.ns["outer"] < 0.015e9 + 0.1e9
    assert timer.ns["outer"] < timer.ns["inner"]  # the outer phase excludes the inner one


def test_script_imports_only_the_standard_library() -> None:
    """The worker runs under another tree's radixlm: importing the file must not import radixlm or torch."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ov', {overhead.SCRIPT!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('radixlm', 'torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd="/")


def test_default_dtype_follows_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(overhead, "cpu_bf16_flags", lambda: [])
    assert overhead.default_dtype("cpu")[0] == "float32"
    monkeypatch.setattr(overhead, "cpu_bf16_flags", lambda: ["amx_bf16"])
    dtype, why = overhead.default_dtype("cpu")
    assert dtype == "bfloat16" and "amx_bf16" in why
    assert overhead.default_dtype("cuda")[0] == "bfloat16"


def _has_commit(rev: str) -> bool:
    try:
        subprocess.run(
            ["git", "-C", str(REPO), "cat-file", "-e", f"{rev}^{{commit}}"], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_commit(BASELINE), reason=f"commit {BASELINE} not in this checkout")
def test_overhead_against_the_old_layout(tmp_path: pathlib.Path) -> None:
    """Before (the old engine/ layout, exported from git) and after in one run, side by side."""
    out = tmp_path / "overhead.json"
    argv = ["overhead", "--models", "tiny", "--batch-sizes", "2", "--steps", "2", "--warmup-steps", "1"]
    argv += ["--dtype", "float32", "--device", "cpu", "--baseline-commit", BASELINE, "--json", str(out)]
    assert bench_main(argv) == 0
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert row["before"]["layout"] == "old" and row["after"]["layout"] == "new"
    assert row["before"]["add_request"] == "add_request(rid, input_ids, params)"
    assert row["before"]["codec"] == "radixlm.engine.ipc"
    for side in ("before", "after"):
        _check_side(row[side], 2, 2)
    assert not pathlib.Path(data["before"]["tree"]).exists()  # the exported tree is removed
