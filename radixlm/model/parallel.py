"""Tensor parallelism: the ranks of one engine, their process group, and how rank 0 hands each step on.

    rank 0 (the core's process)                  ranks 1 .. N-1 (spawned by rank 0)
      scheduler -> StepInput
      TPLeader.send_step ---- ZMQ PUSH, msgpack ---->  run_tp_worker: receive -> forward -> sample
      ModelRunner.forward  <--- torch.distributed collectives inside the layers --->  ModelRunner.forward

Every rank holds a shard of each linear layer (layers/linear.py), of the embedding and of the LM head
(layers/embedding.py), and its share of the KV heads. The layers all-reduce and all-gather on the default
process group (gloo on CPU, NCCL on CUDA), so each rank ends a step with the same logits, builds the same
SamplingBatch from the same StepInput and samples the same tokens: no exchange of results is needed
(`RADIXLM_TP_CHECK_AGREEMENT=1` makes every step check that with an all-gather).

Why a socket for the step and not a torch.distributed broadcast: an idle engine would leave the other
ranks blocked in a collective that times out after a while, and a collective cannot notice that rank 0
died; a socket poll can wait forever and check between polls that rank 0 still lives (its process is the
parent on node 0; on another node, the rendezvous store rank 0 serves still answers).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import threading
import weakref
from typing import TYPE_CHECKING, Any

import msgpack
import torch
import torch.distributed as dist

from radixlm.model.step_input import StepInput, step_from_wire, step_to_wire

if TYPE_CHECKING:
    from radixlm.config import EngineConfig, RuntimeConfig

logger = logging.getLogger(__name__)

AGREEMENT_ENV = "RADIXLM_TP_CHECK_AGREEMENT"
# A collective that waits longer than this has lost a peer; the engine fails rather than hangs.
COLLECTIVE_TIMEOUT_S = 120
_JOIN_TIMEOUT_S = 10
_POLL_MS = 500

# message kinds, rank 0 -> the others
_KV, _STEP, _STOP = "kv", "step", "stop"


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Each rank on its own GPU (cuda:rank on one node); on a CPU every rank shares the host."""
    if device.type == "cuda":
        return torch.device("cuda", rank)
    return device


def threads_per_rank(size: int) -> int:
    """The machine's cores split between the ranks, so that N ranks on one host do not oversubscribe it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // size)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, size: int, init_method: str, device: torch.device) -> None:
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process")
    dist.init_process_group(
        backend_for(device),
        init_method=init_method,
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def gather_ints(value: int, device: torch.device) -> list[int]:
    """One int from every rank, in rank order, on every rank."""
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [int(p.item()) for p in parts]


def check_ranks_agree(next_token_ids: torch.Tensor) -> None:
    """All-gather every rank's sampled ids and raise if any rank differs (a test-time check)."""
    parts = [torch.empty_like(next_token_ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, next_token_ids.contiguous())
    for r, p in enumerate(parts[1:], start=1):
        if not torch.equal(p, parts[0]):
            raise RuntimeError(
                f"tensor-parallel ranks disagree: rank 0 sampled {parts[0].tolist()}, rank {r} {p.tolist()}"
            )


def agreement_check_enabled() -> bool:
    return os.environ.get(AGREEMENT_ENV) == "1"


def node_ranks(config: EngineConfig, node: int) -> range:
    """The tensor-parallel ranks a node runs: tp_size / nnodes consecutive ones."""
    per = config.tp_size // config.nnodes
    return range(node * per, (node + 1) * per)


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def remote_step_address(config: EngineConfig, rank: int) -> str:
    """Where a rank on another node receives its steps: node 0's host, the rendezvous port + rank."""
    assert config.dist_init_addr is not None
    host, port = _split_addr(config.dist_init_addr)
    return f"tcp://{host}:{port + rank}"


def _spawn_ranks(config: EngineConfig, ranks: range | list[int], init_method: str, address) -> list:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that runs torch's thread pools
    procs = [
        ctx.Process(
            target=run_tp_worker,
            args=(config, rank, init_method, address(rank), os.getpid()),
            name=f"radixlm-tp{rank}",
            daemon=True,
        )
        for rank in ranks
    ]
    for p in procs:
        p.start()
    return procs


class TPLeader:
    """Rank 0's side: starts this node's ranks 1..k-1, joins the process group with every rank (on other
    nodes too), sends each step."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        import zmq

        self.size = config.tp_size
        self._dir = tempfile.mkdtemp(prefix="radixlm-tp-")
        local = list(node_ranks(config, 0))[1:]
        multi_node = config.nnodes > 1
        init_method = f"tcp://{config.dist_init_addr}" if multi_node else f"tcp://127.0.0.1:{_free_port()}"
        self._procs = _spawn_ranks(config, local, init_method, self._local_socket)
        self._zmq = zmq.Context()
        self._socks = []
        for rank in range(1, self.size):
            sock = self._zmq.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            if rank in local:
                sock.bind(self._local_socket(rank))
            else:  # a rank on another node connects to node 0 over TCP
                _, port = _split_addr(remote_step_address(config, rank).removeprefix("tcp://"))
                sock.bind(f"tcp://*:{port}")
            self._socks.append(sock)
        logger.info(
            "tensor parallel: %d ranks on %d node(s) (%s), rendezvous %s",
            self.size, config.nnodes, backend_for(device), init_method,
        )  # fmt: skip
        init_group(0, self.size, init_method, device)  # returns once every rank has joined
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._socks, self._zmq, self._dir)

    def _local_socket(self, rank: int) -> str:
        return f"ipc://{os.path.join(self._dir, f'rank{rank}')}"

    @property
    def pids(self) -> list[int]:
        """This node's other ranks' process ids (for operators and tests)."""
        return [p.pid for p in self._procs if p.pid is not None]

    def check_alive(self) -> None:
        dead = [(p.name, p.exitcode) for p in self._procs if p.exitcode is not None]
        if dead:
            raise RuntimeError(f"tensor-parallel rank(s) exited: {', '.join(f'{n} (code {c})' for n, c in dead)}")

    def _send(self, kind: str, payload: Any) -> None:
        self.check_alive()
        data = msgpack.packb([kind, payload], use_bin_type=True)
        for sock in self._socks:
            sock.send(data, copy=False)

    def send_kv(self, runtime: RuntimeConfig, num_rows: int) -> None:
        self._send(_KV, {"runtime": runtime.as_dict(), "rows": num_rows})

    def send_step(self, step: StepInput) -> None:
        self._send(_STEP, step_to_wire(step))

    def close(self) -> None:
        self._finalizer()
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()


def _stop_workers(procs: list, socks: list, ctx: Any, folder: str) -> None:
    stop = msgpack.packb([_STOP, None], use_bin_type=True)
    for sock in socks:
        with contextlib.suppress(Exception):
            sock.send(stop, flags=1)  # zmq.NOBLOCK: a dead rank must not block the shutdown
    for p in procs:
        p.join(timeout=_JOIN_TIMEOUT_S)
        if p.is_alive():
            p.kill()
            p.join(timeout=_JOIN_TIMEOUT_S)
    for sock in socks:
        sock.close(linger=0)
    ctx.term()
    shutil.rmtree(folder, ignore_errors=True)


def run_follower_node(config: EngineConfig) -> int:
    """A node other than 0 (`--node-rank K`): run its ranks until they end; no scheduler, no server."""
    if config.nnodes < 2 or not 0 < config.node_rank < config.nnodes:
        raise ValueError(f"node_rank {config.node_rank} of nnodes {config.nnodes} is not a follower node")
    ranks = node_ranks(config, config.node_rank)
    procs = _spawn_ranks(
        config, ranks, f"tcp://{config.dist_init_addr}", lambda r: remote_step_address(config, r)
    )
    logger.info("node %d: tensor-parallel ranks %s started", config.node_rank, list(ranks))
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=_JOIN_TIMEOUT_S)
    return max((p.exitcode or 0) for p in procs) if procs else 0


class LeaderWatch:
    """Whether rank 0 still lives, asked by an idle rank between polls.

    On node 0 rank 0 is the parent process. A rank on another node has a launcher for a parent, so it also
    asks the rendezvous store, which lives in rank 0's process: once that process is gone, the store's
    socket is closed and the call fails at once.
    """

    def __init__(self, config: EngineConfig, rank: int, init_method: str, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        self._store = None
        if rank not in node_ranks(config, 0):
            host, port = _split_addr(init_method.removeprefix("tcp://"))
            self._store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=10))

    def why_gone(self) -> str | None:
        if os.getppid() != self.parent_pid:
            return "its parent process exited"
        if self._store is not None:
            try:
                self._store.check(["radixlm/leader"])
            except Exception as exc:  # DistNetworkError and friends: the store's process is gone
                return f"rank 0's rendezvous store stopped answering ({type(exc).__name__})"
        return None


def _exit_if_orphaned(rank: int, parent_pid: int, started: threading.Event) -> None:
    """Until `started` is set: a rank waits in the rendezvous (init_group) for every other rank, for torch's
    timeout of many minutes, and before LeaderWatch exists nothing notices its parent die meanwhile (a node
    killed during start-up left its rank behind, waiting). No rank will join it then: leave at once."""
    while not started.wait(1.0):
        if os.getppid() != parent_pid:
            logger.error("tp rank %d: its parent process exited during start-up; stopping", rank)
            os._exit(1)


def run_tp_worker(config: EngineConfig, rank: int, init_method: str, address: str, parent_pid: int) -> None:
    """Ranks 1..N-1: load this rank's shard, then run every step rank 0 sends until told to stop."""
    import zmq

    from radixlm.config import RuntimeConfig
    from radixlm.model.runner import ModelRunner

    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.INFO))
    started = threading.Event()
    threading.Thread(target=_exit_if_orphaned, args=(rank, parent_pid, started), daemon=True).start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(address)
    runner = ModelRunner(config, tp_rank=rank, init_method=init_method)
    leader = LeaderWatch(config, rank, init_method, parent_pid)
    started.set()  # from here LeaderWatch answers for the parent (and, across nodes, for rank 0)
    try:
        while True:
            if not sock.poll(_POLL_MS):
                why = leader.why_gone()
                if why is not None:  # rank 0 is gone: nobody will send a stop
                    logger.error("tp rank %d: rank 0 is gone (%s); stopping", rank, why)
                    sys.exit(1)
                continue
            kind, payload = msgpack.unpackb(sock.recv(), raw=False)
            if kind == _STOP:
                return
            if kind == _KV:
                runner.allocate_kv(RuntimeConfig(**payload["runtime"]), payload["rows"])
            elif kind == _STEP:
                step = step_from_wire(payload)
                out = runner.forward(step)  # its prompt logprobs are rank 0's to report; ignored here
                if step.sampling:
                    runner.sample(out.logits, step)
    finally:
        sock.close(linger=0)
        ctx.term()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
