"""Waiting-queue orderings, as small objects the scheduler asks once per admission wave.

- fcfs: arrival order.
- lpm: longest cached prefix first, so requests whose KV is in the tree run before it is evicted; on a very
  long queue the per-request matching costs more than it saves, so it falls back to fcfs.
- dfs-weight: walk the radix tree depth-first, heavier subtrees (more waiting requests under them) first,
  so requests that share a prefix run back to back and the shared KV is computed once and reused.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol

from radixlm.core.request import Request
from radixlm.kv.prefix_cache import PrefixCache

LPM_FALLBACK_QUEUE_LEN = 128


class SchedulePolicy(Protocol):
    def order(self, waiting: list[Request], cache: PrefixCache) -> list[Request]: ...


class FCFSPolicy:
    def order(self, waiting: list[Request], cache: PrefixCache) -> list[Request]:
        return list(waiting)


class LongestPrefixMatchPolicy:
    def order(self, waiting: list[Request], cache: PrefixCache) -> list[Request]:
        if not cache.shares_prefixes or len(waiting) > LPM_FALLBACK_QUEUE_LEN:
            return list(waiting)
        lengths = {id(r): cache.match(r.token_ids[:-1]).length for r in waiting}
        # sorted() is stable: equal matches keep arrival order
        return sorted(waiting, key=lambda r: -lengths[id(r)])


class DFSWeightPolicy:
    def order(self, waiting: list[Request], cache: PrefixCache) -> list[Request]:
        if not cache.shares_prefixes or len(waiting) > LPM_FALLBACK_QUEUE_LEN:
            return list(waiting)
        by_node: dict[int, list[Request]] = defaultdict(list)
        nodes = {}
        for r in waiting:
            node = cache.match(r.token_ids[:-1]).handle
            by_node[id(node)].append(r)
            nodes[id(node)] = node
        weight: dict[int, int] = defaultdict(int)
        for nid, reqs in by_node.items():
            node = nodes[nid]
            while node is not None:  # every ancestor carries the requests below it
                weight[id(node)] += len(reqs)
                node = cache.parent(node)
        root = cache.root
        ordered: list[Request] = []
        stack = [root]
        while stack:
            node = stack.pop()
            ordered.extend(by_node.get(id(node), ()))
            children = [c for c in cache.children(node) if weight.get(id(c), 0)]
            # push lightest first so the heaviest subtree is visited next
            stack.extend(sorted(children, key=lambda c: weight[id(c)]))
        return ordered


def make_policy(name: str) -> SchedulePolicy:
    policies = {"fcfs": FCFSPolicy, "lpm": LongestPrefixMatchPolicy, "dfs-weight": DFSWeightPolicy}
    return policies[name]()
