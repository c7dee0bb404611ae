"""`radixlm bench serving --backend vllm`: the command line, the server's command and payloads, and process
handling (radixlm/bench/vllm_server.py, launched_server.py, serving.py).

The fast tests start no vLLM. The end-to-end one runs the real benchmark against a fake "vLLM python": a
script that answers like vLLM's OpenAI server (/health, /version, /v1/models, streaming /v1/completions),
records the command line, environment and request bodies it got, and starts a helper process in its group
as vLLM's EngineCore does, so the test can check what radixlm sent and that nothing outlives the run.

The one test that starts real vLLM is marked slow and runs only when RADIXLM_VLLM_PYTHON names vLLM's
python (e.g. /work/vllm-venv/bin/python); its start-up takes minutes:
    RADIXLM_VLLM_PYTHON=/work/vllm-venv/bin/python pytest -m slow tests/bench/test_bench_serving_vllm.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import signal
import stat
import sys
import time

import pytest

from radixlm.bench import serving, vllm_server
from radixlm.bench.cli import build_parser
from radixlm.bench.cli import main as bench_main
from radixlm.bench.launched_server import LaunchedServer, ServerUnavailable, terminate_as_exit
from radixlm.bench.vllm_baseline import ENV_PYTHON
from radixlm.testing import cached_model_folder


def _ns(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serving", *argv])


def _executable(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


# ---- command line ----


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("radixlm", ("radixlm",)),
        ("vllm", ("vllm",)),
        ("both", ("radixlm", "transformers")),  # its meaning from before vLLM was a backend
        ("all", ("radixlm", "transformers", "vllm")),
        ("radixlm,vllm", ("radixlm", "vllm")),
        ("vllm, radixlm", ("vllm", "radixlm")),
    ],
)
def test_backend_spellings(arg: str, expected: tuple[str, ...]) -> None:
    assert _ns("--backend", arg).backend == expected


def test_default_backend_is_radixlm_alone() -> None:
    assert _ns().backend == ("radixlm",)


@pytest.mark.parametrize("arg", ["vlm", "radixlm,sglang", "radixlm,radixlm", ""])
def test_bad_backend_is_a_usage_error(arg: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        _ns("--backend", arg)
    assert exc.value.code == 2
    assert "--backend" in capsys.readouterr().err


def test_vllm_backend_without_its_python_names_the_flag(capsys) -> None:
    # Refused before any model is built or server started.
    assert bench_main(["serving", "--backend", "all"]) == 1
    assert "--vllm-python" in capsys.readouterr().err
    assert serving.check_args(_ns("--backend", "radixlm,vllm")).startswith(
        "--backend vllm needs --vllm-python"
    )
    # Against a running server, no python is needed.
    assert serving.check_args(_ns("--backend", "vllm", "--base-url", "http://127.0.0.1:1")) is None


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--backend", "radixlm,vllm", "--base-url", "http://127.0.0.1:1"], "--base-url"),
        (["--max-concurrency", "0"], "--max-concurrency"),
        (["--min-output", "9", "--max-output", "8"], "--min-output"),
    ],
)
def test_bad_combinations_name_the_flag(argv: list[str], flag: str) -> None:
    assert flag in serving.check_args(_ns(*argv))


def test_missing_vllm_python_is_unavailable_by_name(tmp_path: pathlib.Path) -> None:
    ns = _ns("--backend", "vllm", "--vllm-python", str(tmp_path / "no-such-python"))
    with pytest.raises(ServerUnavailable, match="--vllm-python .*no-such-python: no such executable"):
        vllm_server.vllm_server(str(tmp_path), ns, 64)


# ---- the server's command, environment and payloads ----


def test_vllm_server_command_and_environment(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/radixlm/only")
    argv = ["--backend", "vllm", "--vllm-python", sys.executable, "--dtype", "float32", "--seed", "3"]
    argv += ["--vllm-max-num-seqs", "16", "--vllm-kv-cache-gib", "0.5", "--vllm-omp-threads-bind", "0-1"]
    argv += ["--vllm-server-args", "--block-size 32 --max-num-batched-tokens 512"]
    server = vllm_server.vllm_server(str(tmp_path), _ns(*argv), 700)
    cmd = server.cmd
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]

    def value(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert value("--model") == str(tmp_path.resolve())
    assert value("--dtype") == "float32" and value("--seed") == "3"
    assert value("--port") == str(server.port) and value("--host") == "127.0.0.1"
    assert value("--max-model-len") == "700"
    assert value("--kv-cache-memory-bytes") == str(2**29)
    assert value("--max-num-seqs") == "16"
    assert "--enable-prefix-caching" in cmd
    assert cmd[-4:] == ["--block-size", "32", "--max-num-batched-tokens", "512"]  # extra flags last
    # The offline baseline's environment: vLLM's own packages only, threads bound as asked.
    assert "PYTHONPATH" not in server.env and "VIRTUAL_ENV" not in server.env
    assert server.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert server.env["HF_HUB_OFFLINE"] == "1"
    assert not math.isfinite(server.startup_s)  # not started


def test_vllm_payload_is_token_ids_with_exact_length() -> None:
    req = serving.ServingRequest(prompt_ids=[5, 6, 7], prompt_text="ignored", max_tokens=9)
    body = serving.payload("vllm", "/m", req)
    assert body["prompt"] == [5, 6, 7] and body["model"] == "/m"
    assert body["max_tokens"] == body["min_tokens"] == 9
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert serving.payload("radixlm", "/m", req) == body  # the same request to both engines


def test_longest_request_counts_prompt_and_output() -> None:
    reqs = [serving.ServingRequest([1] * 10, "", 5), serving.ServingRequest([1] * 3, "", 20)]
    assert vllm_server.longest_request(reqs) == 23


def test_table_has_startup_and_ratio_columns() -> None:
    def result(system: str, backend: str, itl: float, startup: float) -> serving.ServingResult:
        metrics = [serving.RequestMetrics(4, ok=True, output_tokens=4, usage_reported=True, ttft=0.5)]
        metrics[0].itls, metrics[0].e2e, metrics[0].end = [itl] * 3, 0.5 + 3 * itl, 1.0
        r = serving.ServingResult.from_metrics(system, metrics, 2.0, backend=backend)
        r.startup_s = startup
        return r

    report = serving.ServingReport({"requests": 1})
    report.results = [result("radixlm", "radixlm", 0.2, 20.0), result("vLLM 9.9", "vllm", 0.4, 300.0)]
    rows = {line.split("  ")[0]: line for line in report.table().splitlines()}
    assert "radixlm vs vLLM 9.9" in report.table()
    assert rows["server start-up (s)"].split()[-1] == "15.00x"  # 300 / 20: lower is better
    assert rows["ITL p50 (ms)"].split()[-1] == "2.00x"


# ---- process handling ----

FAKE_SERVER = r'''
"""Answers /health once ready; starts a helper in its own process group, as vLLM's EngineCore is."""
import http.server, json, os, subprocess, sys, time

mode, port, info = sys.argv[1], int(sys.argv[2]), sys.argv[3]
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(info, "w") as f:
    json.dump({"pid": os.getpid(), "helper": helper.pid}, f)
print("fake server: loading", flush=True)
if mode == "die":
    print("fake server: RuntimeError: out of memory while loading", flush=True)
    sys.exit(3)
if mode == "leader-exits":  # the leader leaves its helper behind in the group
    os._exit(0)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if mode == "ok" else 503)
        self.end_headers()

    def log_message(self, *a):
        pass


http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def _fake(tmp_path: pathlib.Path, mode: str, timeout: float = 20.0) -> tuple[LaunchedServer, pathlib.Path]:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    info = tmp_path / f"{mode}.json"
    port = serving.free_port()
    cmd = [sys.executable, str(script), mode, str(port), str(info)]
    return LaunchedServer(f"fake-{mode}", cmd, port, dict(os.environ), timeout), info


def _pids(info: pathlib.Path) -> tuple[int, int]:
    data = json.loads(info.read_text())
    return data["pid"], data["helper"]


def test_server_group_is_killed_on_an_error_inside_the_run(tmp_path: pathlib.Path) -> None:
    server, info = _fake(tmp_path, "ok")
    with pytest.raises(KeyboardInterrupt), server:  # Ctrl-C during the run
        assert server.startup_s > 0
        pid, helper = _pids(info)
        assert _alive(pid) and _alive(helper)
        raise KeyboardInterrupt
    assert _wait_gone(pid) and _wait_gone(helper)


def test_a_helper_left_by_an_exited_leader_is_killed(tmp_path: pathlib.Path) -> None:
    server, info = _fake(tmp_path, "leader-exits", timeout=3)
    with pytest.raises(ServerUnavailable, match="exited with code 0 while starting"):
        server.__enter__()
    _, helper = _pids(info)
    assert _wait_gone(helper)


def test_a_server_that_dies_while_starting_shows_its_log_tail(tmp_path: pathlib.Path) -> None:
    server, info = _fake(tmp_path, "die")
    with pytest.raises(ServerUnavailable) as exc, server:
        pass
    message = str(exc.value)
    assert "fake-die exited with code 3 while starting" in message
    assert "out of memory while loading" in message  # the server's own last words
    assert _wait_gone(_pids(info)[1])


def test_a_server_that_never_gets_healthy_times_out_and_is_killed(tmp_path: pathlib.Path) -> None:
    server, info = _fake(tmp_path, "unhealthy", timeout=2)
    with pytest.raises(ServerUnavailable, match=r"did not answer /health within 2s \(--server-timeout\)"):
        server.__enter__()
    pid, helper = _pids(info)
    assert _wait_gone(pid) and _wait_gone(helper)


def test_sigterm_inside_terminate_as_exit_raises_system_exit() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc, terminate_as_exit():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
    assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


# ---- end to end, against a fake vLLM server ----

FAKE_VLLM_PYTHON = r'''
"""Run as `PYTHON -m vllm.entrypoints.openai.api_server --model M --port P ...`, like vLLM's server."""
import http.server, json, os, subprocess, sys

argv = sys.argv[1:]
assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"], argv
opt = lambda flag: argv[argv.index(flag) + 1]
record = os.environ["FAKE_VLLM_RECORD"]
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # its "EngineCore"
state = {"argv": argv, "pid": os.getpid(), "helper": helper.pid, "bodies": [],
         "env": {k: os.environ.get(k) for k in ("PYTHONPATH", "VIRTUAL_ENV", "VLLM_CPU_OMP_THREADS_BIND")}}


def save():
    with open(record, "w") as f:
        json.dump(state, f)


save()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def _json(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self._json({})
        elif self.path == "/version":
            self._json({"version": "0.0.fake"})
        elif self.path == "/v1/models":
            self._json({"data": [{"id": opt("--model")}]})
        else:
            self.send_error(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state["bodies"].append(body)
        save()
        ok = (body.get("model") == opt("--model") and all(isinstance(t, int) for t in body["prompt"])
              and body.get("ignore_eos") is True and body.get("temperature") == 0.0)
        if not ok:
            return self._json({"error": {"message": "unexpected request", "body": body}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(body["max_tokens"]):
            self.wfile.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
            self.wfile.flush()
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
        self.wfile.write(("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\ndata: [DONE]\n\n").encode())

    def log_message(self, *a):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(opt("--port"))), Handler).serve_forever()
'''


def test_bench_serving_against_a_fake_vllm_server(tmp_path: pathlib.Path, monkeypatch) -> None:
    tiny = str(cached_model_folder("qwen2", "tiny"))
    script = tmp_path / "fake_vllm_server.py"
    script.write_text(FAKE_VLLM_PYTHON)
    python = _executable(tmp_path / "python", f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    monkeypatch.setenv("PYTHONPATH", "/radixlm/only")
    out = tmp_path / "serving.json"
    argv = ["serving", "--backend", "vllm", "--vllm-python", python, "--vllm-omp-threads-bind", "0"]
    argv += ["--model-path", tiny, "--num-requests", "4", "--max-concurrency", "2"]
    argv += ["--min-prompt", "8", "--max-prompt", "24", "--min-output", "2", "--max-output", "6"]
    argv += ["--server-timeout", "60", "--json", str(out)]
    assert bench_main(argv) == 0
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert result["system"] == "vLLM 0.0.fake" and result["backend"] == "vllm"
    assert result["completed"] == 4 and result["failed"] == 0, result["notes"]
    assert result["output_tokens"] == data["workload"]["requested_output_tokens"]
    assert result["prompt_tokens"] == data["workload"]["prompt_tokens"]
    assert result["startup_s"] > 0
    assert data["workload"]["max_concurrency"] == 2

    seen = json.loads(record.read_text())
    assert seen["env"] == {"PYTHONPATH": None, "VIRTUAL_ENV": None, "VLLM_CPU_OMP_THREADS_BIND": "0"}
    bodies = seen["bodies"]
    assert len(bodies) == 2 + 4  # the two warmup requests, then the timed ones
    assert all(b["min_tokens"] == b["max_tokens"] for b in bodies)
    # The server and its helper are gone once the benchmark returns.
    assert _wait_gone(seen["pid"]) and _wait_gone(seen["helper"])


# ---- real vLLM (slow: minutes of start-up) ----

VLLM_PYTHON = os.environ.get(ENV_PYTHON, "")


@pytest.mark.slow
@pytest.mark.skipif(
    not (VLLM_PYTHON and os.access(VLLM_PYTHON, os.X_OK)),
    reason=f"set {ENV_PYTHON} to vLLM's python (e.g. /work/vllm-venv/bin/python) to run real vLLM",
)
def test_real_vllm_server_serves_four_requests(tmp_path: pathlib.Path) -> None:
    # The "small" qwen2 shape (head_dim 64): vLLM's CPU attention has no kernel for tiny's head_dim 16.
    model = str(cached_model_folder("qwen2", "small"))
    out = tmp_path / "serving.json"
    argv = ["serving", "--backend", "vllm", "--vllm-python", VLLM_PYTHON, "--vllm-kv-cache-gib", "0.25"]
    argv += ["--model-path", model, "--dtype", "float32", "--num-requests", "4"]
    argv += ["--min-prompt", "16", "--max-prompt", "48", "--min-output", "4", "--max-output", "8"]
    argv += ["--server-timeout", "900", "--json", str(out)]
    assert bench_main(argv) == 0
    data = json.loads(out.read_text())
    assert not data["unavailable"], data["unavailable"]
    (result,) = data["results"]
    assert result["system"].startswith("vLLM 0.")
    assert result["completed"] == 4 and result["failed"] == 0, result["notes"]
    # ignore_eos + min_tokens: exactly the requested tokens, counted from vLLM's own usage.
    assert result["output_tokens"] == data["workload"]["requested_output_tokens"]
    assert result["prompt_tokens"] == data["workload"]["prompt_tokens"]
    assert result["startup_s"] > 0 and result["itl_ms"]["p50"] > 0
