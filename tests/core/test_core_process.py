"""The EngineCore in its own process: same tokens as inline, private sockets, clean failure and cleanup."""

from __future__ import annotations

import multiprocessing.context
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from radixlm import Engine
from radixlm.testing import cached_model_folder

PROMPTS = ["The capital of France is", "Once upon a time", "1 2 3 4"]
GREEDY = {"max_new_tokens": 12, "temperature": 0.0}
# Long enough that it cannot finish before the test kills the core (and more than the pool holds at once).
LONG = {"max_new_tokens": 4000, "temperature": 0.0, "ignore_eos": True}


def _options(**extra) -> dict:
    path = str(cached_model_folder("llama", "tiny"))
    return {"model_path": path, "dtype": "float32", "max_total_tokens": 4096, "log_level": "warning", **extra}


def _ids(results: list[dict]) -> list[list[int]]:
    return [r["output_ids"] for r in results]


def _pid_gone(pid: int) -> bool:
    """Exited *and* reaped: a zombie still answers os.kill(pid, 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _exited(pid: int) -> bool:
    """For a process that is not our child: gone, or a zombie waiting for a reaper we do not control."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    with Engine(**_options(inline_core=True)) as llm:
        assert llm.core_pid is None
        return _ids(llm.generate(PROMPTS, GREEDY))


# Engine.generate submits to its private loop before async_generate checks liveness; once shut down that
# loop is closed, so the call raises at once and its coroutine is never awaited (a harmless warning).
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")
def test_process_core_matches_inline_and_cleans_up(reference: list[list[int]]) -> None:
    llm = Engine(**_options())
    assert not llm.config.inline_core  # the process is the default
    pid = llm.core_pid
    assert pid is not None and pid != os.getpid() and not _pid_gone(pid)
    assert llm.is_alive()

    sock_dir = llm._client.socket_dir
    assert os.path.basename(sock_dir).startswith("radixlm-")
    assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o700  # private: mkdtemp
    entries = os.listdir(sock_dir)
    assert entries and all(stat.S_ISSOCK(os.stat(os.path.join(sock_dir, e)).st_mode) for e in entries)

    assert _ids(llm.generate(PROMPTS, GREEDY)) == reference
    assert llm.get_server_info()["core_pid"] == pid
    llm.check()

    start = time.monotonic()
    llm.shutdown()
    assert time.monotonic() - start < 10
    assert _pid_gone(pid)
    assert not os.path.exists(sock_dir)
    assert not llm.is_alive()
    llm.shutdown()  # idempotent
    with pytest.raises(RuntimeError):
        llm.generate("hi", GREEDY)


def test_two_engines_side_by_side(reference: list[list[int]]) -> None:
    a, b = Engine(**_options()), Engine(**_options())
    try:
        assert a.core_pid != b.core_pid
        assert a._client.socket_dir != b._client.socket_dir
        results: dict[str, list[list[int]]] = {}

        def run(name: str, llm: Engine) -> None:
            results[name] = _ids(llm.generate(PROMPTS, GREEDY))

        threads = [threading.Thread(target=run, args=(n, e)) for n, e in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == {"a": reference, "b": reference}
    finally:
        a.shutdown()
        b.shutdown()
    assert _pid_gone(a.core_pid) and _pid_gone(b.core_pid)


def test_missing_model_raises_value_error_and_leaves_nothing(monkeypatch, tmp_path) -> None:
    started: list[multiprocessing.context.SpawnProcess] = []
    real_start = multiprocessing.context.SpawnProcess.start

    def recording_start(self):
        started.append(self)
        real_start(self)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", recording_start)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the socket folder goes

    with pytest.raises(ValueError, match="/nonexistent/folder"):
        Engine(model_path="/nonexistent/folder", log_level="warning")
    assert len(started) == 1
    assert started[0].exitcode is not None and _pid_gone(started[0].pid)
    assert started[0] not in multiprocessing.active_children()
    assert list(tmp_path.iterdir()) == []


def test_killed_core_fails_requests_fast() -> None:
    llm = Engine(**_options())
    try:
        batch: list = []
        worker = threading.Thread(target=lambda: batch.append(llm.generate(PROMPTS[:2], LONG)))
        worker.start()
        stream = llm.generate(PROMPTS[2], LONG, stream=True)
        next(stream)  # the core is generating now
        deadline = time.monotonic() + 30
        while llm.get_server_info()["num_running"] + llm.get_server_info()["num_waiting"] < 3:
            assert time.monotonic() < deadline, "the batch never reached the core"
            time.sleep(0.01)

        os.kill(llm.core_pid, signal.SIGKILL)
        start = time.monotonic()
        chunks = list(stream)
        worker.join(timeout=10)
        assert time.monotonic() - start < 5
        # In-flight requests end with an abort finish reason (like any abort), not an exception.
        assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert "exited with code -9" in chunks[-1]["meta_info"]["finish_reason"]["message"]
        assert [r["meta_info"]["finish_reason"]["type"] for r in batch[0]] == ["abort", "abort"]
        assert not llm.is_alive()

        start = time.monotonic()
        with pytest.raises(RuntimeError, match="not running"):
            llm.generate("hi", GREEDY)
        with pytest.raises(RuntimeError):
            llm.get_server_info()
        assert time.monotonic() - start < 5
    finally:
        sock_dir = llm._client.socket_dir
        llm.shutdown()
    assert _pid_gone(llm.core_pid)
    assert not os.path.exists(sock_dir)


ORPHAN_SCRIPT = """
import time
from radixlm import Engine
llm = Engine(**OPTIONS)
print(llm.core_pid, llm._client.socket_dir, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_core_exits_when_its_parent_is_killed() -> None:
    script = ORPHAN_SCRIPT.replace("OPTIONS", repr(_options()))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        core_pid, sock_dir = parent.stdout.readline().split()
        core_pid = int(core_pid)
        assert not _exited(core_pid) and os.path.isdir(sock_dir)
        parent.kill()  # SIGKILL: no atexit hook, no shutdown; only the core's watchdog can notice
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not (_exited(core_pid) and not os.path.exists(sock_dir)):
            assert time.monotonic() < deadline, "the core process outlived its parent"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.stdout.close()
