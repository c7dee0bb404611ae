"""Data parallelism: N engine replicas (each its own core process, KV cache and radix tree) behind one
front, and the router that picks a replica for each request.

The router is a core client (core_client.CoreClientBase) holding one client per replica, so the Engine
works unchanged: an AddRequest goes to one replica, an abort to the replica that holds the request, a
control call to every replica (replies combined). Policies (`load_balance_method`):

    round_robin   replicas in turn
    cache_aware   the replica whose radix tree most likely holds the longest prefix of the prompt, unless
                  it is busier than the least-loaded replica by more than `balance_threshold` running
                  requests; then the least loaded. The router cannot see the replicas' trees, so it keeps
                  its own approximation: the prompts it routed to each replica, as hashes of their
                  block-aligned prefixes (bounded, least recently used first out).

A replica that dies takes only itself down: its requests end with an abort, later requests go to the
others; the Engine hears CoreFailed only when no replica is left.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from radixlm.config import EngineConfig
from radixlm.frontend.core_client import CoreClientBase
from radixlm.messages import (
    ABORT_CORE_DIED,
    AbortRequest,
    AddRequest,
    ControlCall,
    ControlReply,
    CoreFailed,
    FinishReason,
    RequestOutput,
    StepOutputs,
)

logger = logging.getLogger(__name__)

PREFIX_BLOCK = 16  # tokens per hashed prefix block: the router's tree resolution
MAX_BLOCKS_PER_REPLICA = 200_000  # about 16 bytes of key each: a few MB for a router that runs for weeks
BALANCE_THRESHOLD = 4  # running requests a cache hit may cost in imbalance before the router balances


class PrefixIndex:
    """Which block-aligned prompt prefixes one replica has seen, most recently used last."""

    def __init__(self, max_blocks: int = MAX_BLOCKS_PER_REPLICA) -> None:
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._max = max_blocks

    @staticmethod
    def _keys(ids: list[int]) -> list[int]:
        # One hash per block boundary, of the whole prefix up to it (a chain: equal keys, equal prefixes
        # up to hash collisions, which only cost a worse routing choice).
        keys, h = [], 0
        for end in range(PREFIX_BLOCK, len(ids) + 1, PREFIX_BLOCK):
            h = hash((h, tuple(ids[end - PREFIX_BLOCK : end])))
            keys.append(h)
        return keys

    def match(self, ids: list[int]) -> int:
        """Tokens of `ids` this replica has seen as a prefix (a multiple of the block size)."""
        n = 0
        for key in self._keys(ids):
            if key not in self._blocks:
                break
            n += PREFIX_BLOCK
        return n

    def insert(self, ids: list[int]) -> None:
        for key in self._keys(ids):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self._max:
            self._blocks.popitem(last=False)


class DataParallelRouter(CoreClientBase):
    def __init__(
        self,
        config: EngineConfig,
        on_message: Callable[[Any], None],
        make_client: Callable[[EngineConfig, Callable[[Any], None]], CoreClientBase],
    ) -> None:
        super().__init__(on_message)
        self.method = config.load_balance_method
        self._route_lock = threading.Lock()
        self._owner: dict[str, int] = {}  # rid -> replica
        self._load: list[int] = []  # unfinished requests routed to each replica
        self._dead: set[int] = set()
        self._turn = itertools.count()
        self._closing = False
        self.indexes: list[PrefixIndex] = []
        self.replicas: list[CoreClientBase] = []
        replica_config = config.replace(dp_size=1)
        try:
            for i in range(config.dp_size):
                self.replicas.append(make_client(replica_config, self._from_replica(i)))
                self._load.append(0)
                self.indexes.append(PrefixIndex())
        except BaseException:
            self.shutdown()
            raise
        self.model_info = {
            **self.replicas[0].model_info,
            "runtime": {
                **(self.replicas[0].model_info.get("runtime") or {}),
                "dp_size": config.dp_size,
                "load_balance_method": self.method,
            },
        }
        logger.info("data parallel: %d replicas, %s routing", config.dp_size, self.method)

    @property
    def pids(self) -> list[int | None]:
        return [getattr(r, "pid", None) for r in self.replicas]

    # ---- to the replicas -------------------------------------------------------------------------
    def send(self, msg: Any) -> None:
        if isinstance(msg, AddRequest):
            with self._route_lock:
                i = self._choose(msg.input_ids)
                for rid in msg.rids:
                    self._owner[rid] = i
                self._load[i] += len(msg.rids)
                self.indexes[i].insert(msg.input_ids)
            self.replicas[i].send(msg)
        elif isinstance(msg, AbortRequest):
            with self._route_lock:
                i = self._owner.get(msg.rid)
            if i is not None:
                self.replicas[i].send(msg)
        else:
            raise TypeError(f"the router does not route {type(msg).__name__}")

    def _choose(self, ids: list[int]) -> int:
        live = [i for i in range(len(self.replicas)) if i not in self._dead]
        if not live:
            return 0  # every replica is dead; its client answers the request with an abort
        if self.method == "round_robin":
            return live[next(self._turn) % len(live)]
        least = min(live, key=lambda i: self._load[i])
        best = max(live, key=lambda i: (self.indexes[i].match(ids), -self._load[i]))
        if self.indexes[best].match(ids) == 0 or self._load[best] > self._load[least] + BALANCE_THRESHOLD:
            return least
        return best

    def call(self, call_type: type[ControlCall], timeout: float | None = 60.0) -> ControlReply:
        """Every live replica gets the call; ok only if all say ok; results listed per replica."""
        replies = [r.call(call_type, timeout) for i, r in enumerate(self.replicas) if i not in self._dead]
        if not replies:
            raise RuntimeError(f"the engine core is not running: {self.dead_reason}")
        failed = [r for r in replies if not r.ok]
        if failed:
            return ControlReply(-1, False, failed[0].result, failed[0].error)
        return ControlReply(-1, True, _combine([r.result for r in replies]))

    def shutdown(self) -> None:
        self._closing = True  # the replicas' "shut down" failures that follow are expected, not deaths
        for r in self.replicas:
            r.shutdown()

    def is_alive(self) -> bool:
        return len(self._dead) < len(self.replicas)

    # ---- from the replicas -----------------------------------------------------------------------
    def _from_replica(self, i: int) -> Callable[[Any], None]:
        def on_message(msg: Any) -> None:
            if isinstance(msg, StepOutputs):
                self._finished(i, [o for o in msg.outputs if o.finished])
                self._on_message(msg)
            elif isinstance(msg, CoreFailed):
                self._replica_died(i, msg)
            else:
                self._on_message(msg)

        return on_message

    def _finished(self, i: int, outs: list[RequestOutput]) -> None:
        if not outs:
            return
        with self._route_lock:
            for o in outs:
                if self._owner.pop(o.rid, None) is not None:
                    self._load[i] -= 1

    def _replica_died(self, i: int, msg: CoreFailed) -> None:
        with self._route_lock:
            self._dead.add(i)
            lost = [rid for rid, owner in self._owner.items() if owner == i]
            for rid in lost:
                del self._owner[rid]
            self._load[i] = 0
            all_dead = len(self._dead) == len(self.replicas)
        if not self._closing:
            logger.error("data-parallel replica %d died (%s); %d requests lost", i, msg.message, len(lost))
        if all_dead:
            if self._mark_dead(msg.message):
                self._on_message(msg)
            return
        reason = FinishReason.abort(ABORT_CORE_DIED, f"engine replica {i} died: {msg.message}")
        self._on_message(StepOutputs([RequestOutput(rid, [], reason, 0, 0, 0) for rid in lost]))


def _combine(results: list[Any]) -> Any:
    """Replica results side by side under "replicas"; at the top level counters (ints) are summed and the
    ratios the core reports are recomputed from the summed counters (dict results only)."""
    if not all(isinstance(r, dict) for r in results):
        return results[0]
    combined: dict[str, Any] = {}
    for key, value in results[0].items():
        if isinstance(value, int) and not isinstance(value, bool):
            combined[key] = sum(r.get(key, 0) for r in results)
        else:
            combined[key] = value
    if "kv_used" in combined and combined.get("kv_capacity"):
        combined["kv_usage"] = combined["kv_used"] / combined["kv_capacity"]
    if "total_prompt_tokens" in combined:
        combined["cache_hit_rate"] = combined.get("total_cached_tokens", 0) / max(1, combined["total_prompt_tokens"])
    combined["replicas"] = results
    return combined
