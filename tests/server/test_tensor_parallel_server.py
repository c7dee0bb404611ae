"""Tensor parallelism through the real server: two "nodes" on loopback serve a request end to end, and a
rank killed under load takes the engine down cleanly (errors to clients, /health 503, no orphans)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from radixlm.testing import cached_model_folder
from tests.server.test_server import Server, _free_port, _pid_alive, _start, _stop

PROMPT_IDS = [5, 17, 300, 42, 9, 1000, 77, 3]


def _greedy_tp1(n: int) -> list[int]:
    from radixlm import Engine

    with Engine(
        model_path=str(cached_model_folder("qwen2", "tiny")), dtype="float32", inline_core=True,
        max_total_tokens=20000, log_level="warning",
    ) as llm:  # fmt: skip
        return llm.generate(input_ids=PROMPT_IDS, sampling_params={"max_new_tokens": n, "temperature": 0})[
            "output_ids"
        ]


def _generate(url: str, n: int, timeout: float = 60) -> httpx.Response:
    body = {"input_ids": PROMPT_IDS, "sampling_params": {"max_new_tokens": n, "temperature": 0}}
    return httpx.post(url + "/generate", json=body, timeout=timeout)


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _pid_alive(p)]


def _children(pid: int) -> list[int]:
    """Direct children of a process, from /proc (no psutil in the test dependencies)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _free_port_pair() -> int:
    """A port P with P + 1 free too: node 0 receives on the rendezvous port and binds rank 1's step socket
    at P + 1 (parallel.remote_step_address). A lone free port once failed here with P + 1 taken by another
    process's connection ("Address already in use")."""
    for _ in range(50):
        port = _free_port()
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


def _two_nodes() -> tuple[Server, subprocess.Popen, Path]:
    """Node 1 (one rank) started first, then node 0 (the server with rank 0), on one loopback rendezvous."""
    rendezvous = _free_port_pair()
    common = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{rendezvous}"]
    log = Path(tempfile.mkstemp(prefix="radixlm-node1-", suffix=".log")[1])
    cmd = [
        sys.executable, "-m", "radixlm.launch_server", "--model-path", str(cached_model_folder("qwen2", "tiny")),
        "--dtype", "float32", "--max-total-tokens", "20000", *common, "--node-rank", "1",
    ]  # fmt: skip
    with open(log, "wb") as out:
        follower = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        return _start(*common, "--node-rank", "0"), follower, log
    except BaseException:
        follower.kill()
        follower.wait(10)
        raise


def test_two_nodes_on_loopback_serve_a_request_end_to_end() -> None:
    server, follower, log = _two_nodes()
    try:
        info = httpx.get(server.url + "/get_server_info", timeout=30).json()
        runtime = info.get("runtime") or info.get("model_info", {}).get("runtime", {})
        assert runtime.get("tp_size") == 2, info
        assert runtime.get("tp_worker_pids") == []  # rank 1 lives on the other "node"
        r = _generate(server.url, 8)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == _greedy_tp1(8)
    finally:
        _stop(server)
        try:
            follower.wait(30)  # node 0's shutdown stops the follower's rank, and the follower with it
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait(10)
            pytest.fail(f"the follower node did not exit after node 0 stopped:\n{log.read_text()[-3000:]}")
    assert follower.returncode == 0, log.read_text()[-3000:]


def test_a_follower_killed_while_its_rank_waits_for_node_0_leaves_no_rank_behind() -> None:
    """Node 1 alone: its rank waits in the rendezvous for a node 0 that never comes. SIGKILL the node's
    process (no cleanup runs): the rank must not wait on for torch's rendezvous timeout (minutes)."""
    rendezvous = _free_port_pair()
    cmd = [
        sys.executable, "-m", "radixlm.launch_server", "--model-path", str(cached_model_folder("qwen2", "tiny")),
        "--dtype", "float32", "--tp-size", "2", "--nnodes", "2", "--node-rank", "1",
        "--dist-init-addr", f"127.0.0.1:{rendezvous}",
    ]  # fmt: skip
    follower = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        ranks: list[int] = []
        while time.monotonic() < deadline and follower.poll() is None:
            # The rank is the child that is not multiprocessing's resource tracker.
            ranks = [c for c in _children(follower.pid) if b"resource_tracker" not in _cmdline(c)]
            if ranks:
                break
            time.sleep(0.2)
        assert ranks, "node 1 started no rank process"
        time.sleep(1.0)  # into its start-up: loading, then waiting for the rendezvous
    finally:
        follower.kill()
        follower.wait(10)
    assert _wait_gone(ranks, 10) == [], "the rank outlived its killed node by 10 s"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow  # about 50 s; CI time
def test_a_follower_node_exits_when_node_0_is_killed_while_idle() -> None:
    """SIGKILL leaves no stop message: the idle rank on node 1 must notice rank 0's store is gone."""
    server, follower, log = _two_nodes()
    children = _children(follower.pid)  # its rank, and multiprocessing's resource tracker
    try:
        core_pid = httpx.get(server.url + "/get_server_info", timeout=30).json().get("core_pid")
        assert core_pid and children, (core_pid, children)
        assert _generate(server.url, 4).status_code == 200  # a healthy step first; then idle
        os.kill(core_pid, signal.SIGKILL)
        server.proc.kill()
        try:
            follower.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node 1 outlived node 0 by 15 s:\n{log.read_text()[-3000:]}")
        assert follower.returncode != 0  # node 0's death is a failure for whoever supervises node 1
        assert "rank 0 is gone" in log.read_text()
    finally:
        if follower.poll() is None:
            follower.kill()
        _stop(server)
    assert _wait_gone(children, 5) == []


@pytest.mark.slow  # about 25 s; CI time
def test_a_rank_killed_under_load_gives_errors_and_503_and_leaves_no_process() -> None:
    server: Server = _start("--tp-size", "2")
    info = httpx.get(server.url + "/get_server_info", timeout=30).json()
    runtime = info.get("runtime") or info.get("model_info", {}).get("runtime", {})
    workers, core_pid = runtime["tp_worker_pids"], info.get("core_pid")
    assert len(workers) == 1 and core_pid
    results: list[object] = []

    def client() -> None:
        try:
            results.append(_generate(server.url, 400, timeout=60).status_code)
        except httpx.HTTPError as exc:
            results.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)  # the requests are decoding
        os.kill(workers[0], signal.SIGKILL)
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a request hung after a rank died"
        assert len(results) == 4 and all(r != 200 for r in results), results
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = httpx.get(server.url + "/health", timeout=5).status_code
            if status == 503:
                break
            time.sleep(0.2)
        assert status == 503
        assert _wait_gone([core_pid], 15) == [], "the core process outlived its dead rank"
    finally:
        _stop(server, core_pid)
    assert _wait_gone([core_pid, *workers], 10) == []
