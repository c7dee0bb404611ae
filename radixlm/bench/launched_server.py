"""A benchmark's server subprocess: started in its own session, ready when /health answers, stopped with
its whole process group.

Every server a benchmark launches (radixlm's launch_server, `transformers serve`, vLLM's api_server) starts
helper processes of its own (radixlm's engine core, vLLM's EngineCore), so the server is started as a new
session and stopped by signalling the group, never just the pid: a leader that already exited can leave a
core process holding gigabytes and both CPU cores. Stopping runs on leaving the `with` block, whatever
ended it (a result, an exception, Ctrl-C), and on SIGTERM to the benchmark (see `terminate_as_exit`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TERM_GRACE_S = 30.0  # a server's own shutdown (radixlm stops its core, vLLM its engine) before SIGKILL


class ServerUnavailable(RuntimeError):
    """A backend that cannot be started here; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(extra_pythonpath: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"  # benchmarks never download anything
    if extra_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_pythonpath, env.get("PYTHONPATH")) if p)
    return env


class LaunchedServer:
    """A server subprocess in its own session, logged to a file, stopped (SIGTERM, then SIGKILL) on exit.

    `startup_s` is the time from starting the process to the first 200 from /health."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        env: dict[str, str],
        timeout: float,
        log_path: str | Path | None = None,
    ) -> None:
        self.name, self.cmd, self.port, self.env, self.timeout = name, cmd, port, env, timeout
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = (
            Path(log_path)
            if log_path
            else Path(tempfile.mkdtemp(prefix=f"radixlm-bench-{name}-")) / "server.log"
        )
        self.proc: subprocess.Popen | None = None
        self.startup_s: float = float("nan")

    def __enter__(self) -> LaunchedServer:
        print(
            f"[bench] starting {self.name}: {shlex.join(self.cmd)}  (log: {self.log_path})", file=sys.stderr
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")  # noqa: SIM115 - the child owns it until it exits
        start = time.perf_counter()
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServerUnavailable(f"{self.name}: could not start {self.cmd[0]}: {exc}") from None
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - start
        print(f"[bench] {self.name} ready after {self.startup_s:.1f}s", file=sys.stderr)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerUnavailable(
                    f"{self.name} exited with code {self.proc.returncode} while starting; "
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.base_url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise ServerUnavailable(
            f"{self.name} did not answer /health within {self.timeout:.0f}s (--server-timeout); "
            f"log tail ({self.log_path}):\n{self.log_tail()}"
        )

    def check_alive(self) -> None:
        """Raise ServerUnavailable with the log tail if the server has exited (e.g. it died mid-run)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerUnavailable(
                f"{self.name} exited with code {self.proc.returncode} during the run; "
                f"log tail ({self.log_path}):\n{self.log_tail()}"
            )

    def stop(self, grace_s: float = TERM_GRACE_S) -> None:
        """SIGTERM the session's process group, wait for the leader, then SIGKILL whatever is left.

        The SIGKILL is sent even when the leader exited by itself: a helper it started (an engine core)
        can outlive it, and it is still in the group."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group's id
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Inside the block, SIGTERM to this process raises SystemExit, so `with LaunchedServer` blocks stop their
    servers (Python's default for SIGTERM is to die at once, leaving them running). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
