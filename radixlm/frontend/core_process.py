"""The EngineCore in its own process: the child's entry point and the parent's `ProcessCoreClient`.

    parent (Engine)                                   child (spawned: a fresh interpreter)
    send() --lock--> PUSH  ==ipc://<tmp>/req==>  PULL  receive(block) -+
                                                                       run_core_loop(EngineCore)
    reader thread <- PULL  <==ipc://<tmp>/out==  PUSH  send(msg)  <----+
         +-- also watches the child's sentinel: an exit we did not ask for fails every request

Why it is built this way:
- "spawn", never fork: a forked copy of a process that already runs torch's thread pools can deadlock.
  Spawn arguments (a plain dict of the EngineConfig fields) are pickled by multiprocessing once, locally,
  at start; everything after that crosses the sockets as msgpack (radixlm/messages.py), never pickle.
- Socket files live in a private `mkdtemp` folder per client, removed at shutdown: no fixed names, so any
  number of engines and servers run side by side (DESIGN.md invariant 6).
- Two one-way PUSH/PULL sockets, not one PAIR/DEALER: a ZMQ socket must only be used by one thread at a
  time. The reader thread owns the output socket outright; the request socket is shared by the Engine's
  loop thread and user threads, so it sits behind a lock. PUSH/PULL also needs no envelopes.
- The child binds the request socket and the parent *connects* to it, with no high-water mark: a connecting
  PUSH queues messages while the peer is absent, so `send` never blocks, not before the child is up and not
  after it died. The parent binds the output socket before the child starts, so CoreReady cannot be lost.
- The parent learns of a dead child from its sentinel (an fd that becomes readable when the child exits),
  polled with the output socket: no timer, no heartbeat. The child learns of a dead parent from a watchdog
  thread that polls `os.getppid()`. (PR_SET_PDEATHSIG is not used: it fires when the parent *thread* that
  started the child exits, which would kill the core of an Engine created on a short-lived thread.)
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # registers its atexit hook now, so ours (registered later) runs first
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import zmq

from radixlm.config import EngineConfig
from radixlm.frontend.core_client import CoreClientBase
from radixlm.messages import FAILED_RUNTIME, FAILED_SHUTDOWN, CoreFailed, CoreReady, Shutdown, decode, encode

logger = logging.getLogger("radixlm")

STARTUP_TIMEOUT_S = 600.0  # loading a large checkpoint from a slow disk takes minutes
SHUTDOWN_TIMEOUT_S = 30.0  # the core answers after its current step; a CPU step can take seconds
PARENT_POLL_S = 0.5  # how often the child's watchdog checks that its parent is still there
LOG_FORMAT = "[radixlm core %(asctime)s %(levelname)s] %(message)s"  # the Engine's format, tagged "core"
LOG_DATEFMT = "%H:%M:%S"
_MAX_IPC_PATH = 100  # sun_path holds 107 bytes on Linux (103 on macOS), with "ipc://" not counted


# ---- child ------------------------------------------------------------------------------------------
def run_core_process(
    config_fields: dict[str, Any],
    request_addr: str,
    output_addr: str,
    parent_pid: int,
    num_threads: int | None,
    log_level: int,
) -> None:
    """The child's entry point: build the EngineCore, report CoreReady or CoreFailed, then serve requests."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when the core stops
    # (shutdown, or its atexit hook), so a KeyboardInterrupt here would only turn a clean stop into a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _setup_child_logging(log_level)
    socket_dir = os.path.dirname(request_addr.removeprefix("ipc://"))
    threading.Thread(
        target=_watch_parent, args=(parent_pid, socket_dir), name="radixlm-core-watchdog", daemon=True
    ).start()

    # How long OpenMP threads spin at a parallel region's barrier before they sleep. Unbounded spinning
    # (OMP_WAIT_POLICY=ACTIVE, or libgomp's default of 300,000 spins) loses a scheduler slice whenever
    # anything else wants the core: with `radixlm serve` on the 0.5B shape, 8 streams' inter-token p50 was
    # 2,075 ms against 467 ms with passive waiting (load 1.5-2.4). Passive waiting (no spin) pays a wake-up
    # at each of a step's ~100 parallel regions instead. A short spin keeps most of both (2-core EPYC VM,
    # bf16; offline: small shape, 32 requests; serving: 0.5B shape, 8 streams of 128 + 32 tokens):
    #   spins     offline s   serving tok/s, ITL p50 (quiet)   the same beside a CPU hog (`yes`)
    #   passive   2.12-2.39   60.1-62.6, 64.5-68.1 ms          40.5, 86.7 ms
    #   3,000     1.84        67.7, 57.3 ms                    33.7, 116.7 ms
    #   30,000    1.80        68.6, 57.1 ms                    16.2, 346.5 ms
    # libgomp reads these once, when torch loads it, which has not happened yet in this fresh process; a
    # value the user exported (either variable) wins.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "3000")
    wait_policy = (
        os.environ.get("OMP_WAIT_POLICY") or f"unset, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}"
    )
    import torch

    if num_threads is not None:  # the parent's count, so the process mode computes like inline mode
        torch.set_num_threads(num_threads)
    logging.getLogger("radixlm").info(
        "core threads: %d intra-op (OMP_WAIT_POLICY=%s), cores %s",
        torch.get_num_threads(),
        wait_policy,
        sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "unknown",
    )

    ctx = zmq.Context()
    requests = ctx.socket(zmq.PULL)
    requests.setsockopt(zmq.RCVHWM, 0)
    requests.bind(request_addr)
    outputs = ctx.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)
    outputs.connect(output_addr)
    send = functools.partial(_send, outputs)
    exit_code = 1
    try:
        try:
            from radixlm.core.engine_core import EngineCore

            core = EngineCore(EngineConfig(**config_fields))
        except Exception as exc:
            send(_startup_failure(exc))
            return
        send(CoreReady(core.model_info()))

        from radixlm.core.core_loop import run_core_loop

        try:
            run_core_loop(core, functools.partial(_receive, requests), send)
            exit_code = 0
        except Exception as exc:  # a bug in the core: fail every waiter loudly rather than hang them
            logger.error("engine core crashed:\n%s", traceback.format_exc())
            send(CoreFailed(FAILED_RUNTIME, f"{type(exc).__name__}: {exc}"))
        finally:
            core.close()  # the other tensor-parallel ranks, if any
    finally:
        # linger: the last message (CoreFailed, or the reply to "shutdown") must reach the parent before
        # term() returns.
        requests.close(linger=0)
        outputs.close(linger=5000)
        ctx.term()
        # Skip the interpreter's teardown (about half a second with torch loaded, all of it spent while
        # the parent's shutdown waits): nothing in this process has anything left to save.
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(exit_code)


def _send(sock: zmq.Socket, msg: Any) -> None:
    sock.send(encode(msg))


def _receive(sock: zmq.Socket, block: bool) -> list[Any]:
    """Block only when the core is idle; otherwise take whatever is already queued, without waiting."""
    msgs = []
    if block:
        _decode_into(msgs, sock.recv())
    while True:
        try:
            data = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return msgs
        _decode_into(msgs, data)


def _decode_into(msgs: list[Any], data: bytes) -> None:
    # Anything the user can run may write to the socket: a message that does not decode is dropped and
    # logged, never allowed to take the engine (and every other request) down.
    try:
        msgs.append(decode(data))
    except Exception as exc:
        logger.error(
            "engine core: dropping a malformed message (%d bytes): %s: %s", len(data), type(exc).__name__, exc
        )


def _startup_failure(exc: BaseException) -> CoreFailed:
    """The parent raises the same kind again (`_startup_message`), so a bad model path is the same
    ModelLoadError (a ValueError) as in inline mode."""
    failed = CoreFailed.from_exception(exc)
    if failed.kind == FAILED_RUNTIME:  # unexpected: the traceback is the useful part, and only we have it
        logger.error("engine core failed to start:\n%s", traceback.format_exc())
    return failed


def _watch_parent(parent_pid: int, socket_dir: str) -> None:
    # When the parent dies (even by SIGKILL, with no chance to clean up) the child is re-parented: then
    # leave at once, removing the socket folder the parent cannot. os._exit, because the main thread may
    # be inside a long torch op or a blocking recv.
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    logger.warning("the engine's process %d exited; the engine core exits too", parent_pid)
    shutil.rmtree(socket_dir, ignore_errors=True)
    logging.shutdown()
    os._exit(1)


def _setup_child_logging(level: int) -> None:
    root = logging.getLogger("radixlm")
    root.setLevel(level)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    root.handlers[:] = [handler]
    root.propagate = False


# ---- parent -----------------------------------------------------------------------------------------
class ProcessCoreClient(CoreClientBase):
    """Starts the core process, waits until it is ready, and relays messages both ways."""

    def __init__(
        self,
        config: EngineConfig,
        on_message: Callable[[Any], None],
        startup_timeout: float = STARTUP_TIMEOUT_S,
    ) -> None:
        super().__init__(on_message)
        self.socket_dir = _make_socket_dir()
        request_addr = f"ipc://{os.path.join(self.socket_dir, 'req')}"
        output_addr = f"ipc://{os.path.join(self.socket_dir, 'out')}"
        self._ctx = zmq.Context()
        self._send_lock = threading.Lock()
        self._shutdown_started = threading.Lock()  # acquired once, never released: shutdown runs once
        self._closing = False
        self._reader: threading.Thread | None = None
        self._requests = self._ctx.socket(zmq.PUSH)
        self._requests.setsockopt(zmq.SNDHWM, 0)
        self._requests.setsockopt(zmq.LINGER, 0)
        self._outputs = self._ctx.socket(zmq.PULL)
        self._outputs.setsockopt(zmq.RCVHWM, 0)
        self._outputs.setsockopt(zmq.LINGER, 0)
        try:
            self._outputs.bind(output_addr)
            self._requests.connect(request_addr)
            fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
            args = (
                fields,
                request_addr,
                output_addr,
                os.getpid(),
                _parent_num_threads(),
                logging.getLogger("radixlm").getEffectiveLevel(),
            )
            # Not a daemon: multiprocessing forbids a daemon to start processes of its own (torch.compile
            # workers may). Our atexit hook stops the child instead.
            self._proc = multiprocessing.get_context("spawn").Process(
                target=run_core_process, args=args, name="radixlm-core", daemon=False
            )
            self._proc.start()
            self._atexit_hook = functools.partial(_shutdown_at_exit, weakref.ref(self))
            atexit.register(self._atexit_hook)
            self.model_info = self._wait_ready(startup_timeout)
        except BaseException:  # includes KeyboardInterrupt during a long load: never leave a child behind
            self._dispose(graceful=False)
            raise
        self._reader = threading.Thread(target=self._read_loop, name="radixlm-core-reader", daemon=True)
        self._reader.start()
        logger.debug("engine core process %d ready (sockets in %s)", self._proc.pid, self.socket_dir)

    @property
    def pid(self) -> int | None:
        proc = getattr(self, "_proc", None)
        return proc.pid if proc is not None else None

    def is_alive(self) -> bool:
        # The sentinel check neither blocks nor reaps, so it is safe from any thread, at any time.
        return self.dead_reason is None and not multiprocessing.connection.wait([self._proc.sentinel], 0)

    def send(self, msg: Any) -> None:
        """Thread-safe. After the core died, an AddRequest gets an abort output instead of silence."""
        if self.dead_reason is None:
            data = encode(msg)
            with self._send_lock:
                if not self._requests.closed:
                    try:
                        # Never blocks: a connecting PUSH with no high-water mark just queues.
                        self._requests.send(data, zmq.NOBLOCK)
                        return
                    except zmq.ZMQError as exc:
                        logger.error("could not send %s to the engine core: %s", type(msg).__name__, exc)
        self._fail_unsent(msg)

    # ---- startup -----------------------------------------------------------------------------------
    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        poller.register(self._proc.sentinel, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the engine core process did not start within {timeout:.0f} s")
            events = dict(poller.poll(timeout=left * 1000))
            if self._outputs in events:
                return self._startup_message(decode(self._outputs.recv()))
            if self._proc.sentinel in events:
                # It may have sent CoreFailed just before exiting: give the socket a moment to deliver it.
                if self._outputs.poll(timeout=500):
                    return self._startup_message(decode(self._outputs.recv()))
                self._proc.join(timeout=5)
                raise RuntimeError(
                    f"the engine core process exited with code {self._proc.exitcode} before it was ready "
                    f"(see its log above). If your script creates the Engine at import time, put that under "
                    f"`if __name__ == '__main__':`, because the core process is started with "
                    f"multiprocessing 'spawn', which imports the main module again."
                )

    def _startup_message(self, msg: Any) -> dict[str, Any]:
        if isinstance(msg, CoreReady):
            return msg.model_info.as_dict()
        if isinstance(msg, CoreFailed):
            self._proc.join(timeout=10)  # it exits right after sending this; reap it before raising
            raise msg.to_exception()
        raise RuntimeError(f"the engine core sent {type(msg).__name__} before CoreReady")

    # ---- running -----------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        poller.register(self._proc.sentinel, zmq.POLLIN)
        while True:
            # The timeout is only a safety net for shutdown; a message or an exit wakes the poll at once.
            events = dict(poller.poll(timeout=1000))
            if self._outputs in events:
                self._drain()
            if self._proc.sentinel in events:
                break
        while self._outputs.poll(timeout=100):  # what the child sent just before it exited
            self._drain()
        if not self._closing:  # an exit nobody asked for (shutdown joins and reports on its own)
            self._proc.join(timeout=5)
            code = self._proc.exitcode
            reason = f"engine core process exited with code {code}"
            if code is not None and code < 0:
                with contextlib.suppress(ValueError):
                    reason += f" (killed by {signal.Signals(-code).name})"
            logger.error("%s", reason)
            self._dispatch(CoreFailed(FAILED_RUNTIME, reason))

    def _drain(self) -> None:
        while True:
            try:
                data = self._outputs.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(data)
            except Exception:  # a malformed message is a bug; dropping it beats killing the reader
                logger.error(
                    "dropping an undecodable message from the engine core:\n%s", traceback.format_exc()
                )
                continue
            try:
                self._dispatch(msg)
            except Exception:  # the Engine's callback failed; the reader must keep serving other requests
                logger.error("error handling a message from the engine core:\n%s", traceback.format_exc())

    # ---- shutdown ----------------------------------------------------------------------------------
    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Ask the core to stop, wait, then terminate/kill if needed; close sockets; remove the folder.

        Idempotent, and safe from a signal handler that interrupts a running shutdown or send: a second
        call returns at once, and every wait here has a timeout, so nothing can wait on itself.
        """
        if not self._shutdown_started.acquire(blocking=False):
            return
        self._closing = True
        if self.dead_reason is None and self._proc.is_alive():
            # Not self.call(): the reply is not needed, the exit is what we wait for.
            if self._send_lock.acquire(timeout=2.0):
                try:
                    self._requests.send(encode(Shutdown(-1)), zmq.NOBLOCK)
                finally:
                    self._send_lock.release()
            self._proc.join(timeout=timeout)
        self._dispose(graceful=True)
        # Requests still in flight get an abort now instead of waiting forever on a core that is gone.
        try:
            self._dispatch(CoreFailed(FAILED_SHUTDOWN, "the engine was shut down"))
        except Exception:  # e.g. a caller's event loop already closed: nothing left to tell
            logger.debug("could not notify requests of the shutdown", exc_info=True)

    def _dispose(self, graceful: bool) -> None:
        """Stop the child for sure and release every resource; each step tolerates being repeated."""
        self._closing = True
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.pid is not None:
            if proc.is_alive():
                if graceful:
                    logger.warning("engine core process %d did not exit in time; terminating it", proc.pid)
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=5)
        reader_done = reader is None or not reader.is_alive()
        with contextlib.suppress(Exception):
            if self._send_lock.acquire(timeout=2.0):
                try:
                    self._requests.close(linger=0)
                finally:
                    self._send_lock.release()
        if reader_done:  # the output socket belongs to the reader thread until it has exited
            with contextlib.suppress(Exception):
                self._outputs.close(linger=0)
            with contextlib.suppress(Exception):
                self._ctx.term()
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        hook = getattr(self, "_atexit_hook", None)
        if hook is not None:
            atexit.unregister(hook)


def _parent_num_threads() -> int | None:
    """torch's intra-op thread count here, if this process already loaded torch (a caller may have set
    it); else None, and the child keeps torch's default. The front itself never imports torch."""
    torch = sys.modules.get("torch")
    get = getattr(torch, "get_num_threads", None)
    return get() if callable(get) else None


def _make_socket_dir() -> str:
    path = tempfile.mkdtemp(prefix="radixlm-")
    if len(os.path.join(path, "req")) > _MAX_IPC_PATH and os.path.isdir("/tmp"):
        # A long $TMPDIR would overflow the socket path limit; /tmp is short and everywhere on POSIX.
        os.rmdir(path)
        path = tempfile.mkdtemp(prefix="radixlm-", dir="/tmp")
    return path


def _shutdown_at_exit(ref: weakref.ref) -> None:
    # A forgotten Engine must not leave its core running (or make multiprocessing's own exit hook wait on it).
    client = ref()
    if client is not None:
        client._atexit_hook = None  # we are that hook; do not unregister it while atexit runs it
        try:
            client.shutdown(timeout=5.0)
        except BaseException:  # even a second Ctrl-C must not skip the kill below
            pass
        client._dispose(graceful=False)  # also when a signal cut an earlier shutdown short
