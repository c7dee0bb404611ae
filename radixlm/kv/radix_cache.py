"""RadixCache: RadixAttention's prefix cache, a radix tree over token ids whose nodes hold KV pool slots.

Ownership contract with the pool (DESIGN.md invariant 2)
---------------------------------------------------------
Every slot of the KVPool is exactly one of:

* **free**: on the pool's free list;
* **tree-held**: in some node's ``value``; *evictable* when that node's ``lock_ref == 0``, *locked* otherwise;
* **private**: allocated by the scheduler for a running request and not (yet) given to the tree.

so the scheduler can assert, after every step::

    pool.num_free_slots + cache.evictable_size + cache.locked_size + private == pool.capacity

The pool counts whole pages, so with ``page_size > 1`` ``private`` must count a request's partly filled last
page as a full page (round its private slots up to pages); tree-held counts are always whole pages.

Slots move between these states only through this interface:

* ``insert(tokens, slots)``: private -> tree-held for tokens the tree did not have; private -> free for a
  token the tree already had under a *different* slot (the tree keeps its own copy, never two). Slots past
  the page-aligned length stay private.
* ``evict(n)``: evictable -> free (whole unlocked leaves, least recently used first).
* ``lock`` / ``unlock``: evictable <-> locked; ``match_prefix`` changes no ownership.
* ``reset()``: tree-held -> free.

The tree frees slots through ``pool.free`` itself; it never allocates. With ``page_size > 1`` the tree
stores whole pages only, so every node's value is a run of complete pages and freeing a node frees exactly
its pages.

Tree shape
----------
The root has an empty edge. A node's ``key`` is the token run on the edge from its parent; the tokens of
a node are its ancestors' keys concatenated with its own. Children are keyed by the first token of their
edge (``page_size == 1``) or by the tuple of the first page's tokens (``page_size > 1``), so two children
never share a first token/page and a lookup is one dict access per edge.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from radixlm.kv.kv_pool import KVPool

_CHUNK = 64  # token run compared at once when looking for the first mismatch


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


def _as_tuple(tokens: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    # Tuples give C-speed slice comparison; a tensor is converted through tolist() (tuple(tensor) would
    # make one 0-d tensor per token).
    if isinstance(tokens, torch.Tensor):
        return tuple(tokens.tolist())
    return tokens if isinstance(tokens, tuple) else tuple(tokens)


def _common_prefix_len(a: tuple[int, ...], start: int, b: tuple[int, ...]) -> int:
    """Length of the common prefix of ``a[start:]`` and ``b``, comparing runs, not single tokens."""
    m = min(len(a) - start, len(b))
    if a[start : start + m] == b[:m]:
        return m
    # Narrow down to the mismatching chunk with slice comparisons, then scan only that chunk.
    lo = 0
    while lo < m:
        hi = min(lo + _CHUNK, m)
        if a[start + lo : start + hi] != b[lo:hi]:
            for i in range(lo, hi):
                if a[start + i] != b[i]:
                    return i
        lo = hi
    return m  # unreachable: the full comparison failed, so some chunk differs


class TreeNode:
    """One edge of the radix tree: ``key`` (token ids) and ``value`` (their KV slots, int64)."""

    __slots__ = ("key", "value", "children", "parent", "lock_ref", "last_access", "id")

    def __init__(
        self,
        key: tuple[int, ...] = (),
        value: torch.Tensor | None = None,
        parent: TreeNode | None = None,
        last_access: float = 0.0,
        node_id: int = 0,
    ) -> None:
        self.key = key
        self.value = _empty() if value is None else value
        self.children: dict[int | tuple[int, ...], TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = last_access
        # Unique and increasing within a tree: the heap's tie-breaker, so equal last_access never
        # compares nodes (assigned by the owning cache; no module-level counter, DESIGN.md invariant 6).
        self.id = node_id

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        head = list(self.key[:8])
        more = "..." if len(self.key) > 8 else ""
        return f"TreeNode(id={self.id}, key={head}{more}, len={len(self.key)}, lock_ref={self.lock_ref})"


@dataclass
class MatchResult:
    slots: torch.Tensor  # [n] int64: the KV slots of the longest cached prefix
    node: TreeNode  # the deepest matched node (root when nothing matched): the handle for lock/unlock

    @property
    def length(self) -> int:
        return int(self.slots.numel())


@dataclass
class InsertResult:
    num_existing: int  # leading tokens that were already in the tree before this insert
    slots: torch.Tensor  # [n] the tree's slots for tokens[:n] after the insert (n page-aligned)
    node: TreeNode  # the node that ends at tokens[:n]


class PrefixCache(ABC):
    """The scheduler's view of a prefix cache. ``RadixCache`` implements it; ``NoPrefixCache`` is the
    null object for ``--disable-radix-cache``.

    Typical use by the scheduler::

        m = cache.match_prefix(req.tokens)       # reuse m.slots for tokens[:m.length]
        cache.lock(m.node)                       # the matched slots cannot be evicted while we run
        ... alloc the rest (cache.evict(k) first if the pool is short) ...
        r = cache.insert(req.tokens[:num_computed], req_slots[:num_computed])   # finished or chunked
        cache.lock(r.node); cache.unlock(m.node) # move the lock to the longer prefix (if still running)
        # req_slots[:len(r.slots)] must be replaced by r.slots: duplicates the caller held were freed.
    """

    page_size: int
    enabled: bool

    @abstractmethod
    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        """Longest cached prefix of ``tokens`` (whole pages only when page_size > 1).

        Splits a node when the match ends inside its edge, so that the returned node ends exactly at the
        match. May refresh ``last_access`` along the path. No other side effects: nothing is locked,
        allocated or freed.
        """

    @abstractmethod
    def insert(self, tokens: Sequence[int], slots: torch.Tensor) -> InsertResult:
        """Store the KV of ``tokens[:n]``, ``n = len(tokens) // page_size * page_size``.

        ``slots[i]`` holds ``tokens[i]``'s KV. Where the tree already has a token, it keeps its own slot
        and the passed slot, if different, is freed to the pool (whole pages): never duplicated. New tokens'
        slots are taken over by the tree. ``slots[n:]`` stay the caller's. Used both for finished requests
        and for the computed part of running (e.g. chunked) requests.
        """

    @abstractmethod
    def lock(self, node: TreeNode) -> None:
        """+1 ``lock_ref`` on ``node`` and every ancestor up to (excluding) the root.

        Locked nodes are never evicted."""

    @abstractmethod
    def unlock(self, node: TreeNode) -> None:
        """Undo one ``lock(node)``; raises RuntimeError if the count would go negative."""

    @abstractmethod
    def evict(self, num_slots: int) -> int:
        """Free least-recently-used unlocked leaves (a parent becomes a leaf once its children go) until at
        least ``num_slots`` slots were freed or nothing is evictable. Returns the slots freed."""

    @abstractmethod
    def reset(self) -> None:
        """Drop everything and give its slots back to the pool; RuntimeError if anything is locked."""

    @property
    @abstractmethod
    def evictable_size(self) -> int:
        """Slots held by unlocked nodes."""

    @property
    @abstractmethod
    def locked_size(self) -> int:
        """Slots held by locked nodes."""

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.locked_size

    @abstractmethod
    def check(self) -> None:
        """Assert the cache's own invariants; raises AssertionError with a message."""


class RadixCache(PrefixCache):
    """A radix tree of token runs whose nodes hold the pool slots of their edge.

    A split at ``k`` (page-aligned) turns one node into two, keeping the lower node's identity so that
    handles held by running requests (and its heap entry) stay valid::

        before:   parent --[a b c d e f]--> node --> children
        after:    parent --[a b c]--> new --[d e f]--> node --> children

    ``new`` takes ``node``'s lock_ref and last_access, so sizes and lock counts are unchanged.
    """

    enabled = True

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self._clock = itertools.count(1)  # last_access values: a deterministic logical clock
        self._ids = itertools.count(1)
        self._init_tree()

    def _init_tree(self) -> None:
        self.root = TreeNode()  # empty edge; never locked, counted or evicted
        self._evictable = 0
        self._locked = 0
        self._num_nodes = 0
        # Min-heap of (last_access, id, node) over evictable leaves. Entries go stale (node re-touched,
        # locked, given a child, or removed) and are dropped when popped; every evictable leaf always has
        # one current entry, pushed whenever it becomes an evictable leaf or is touched.
        self._heap: list[tuple[float, int, TreeNode]] = []

    # ---- sizes ------------------------------------------------------------------------------------
    @property
    def evictable_size(self) -> int:
        return self._evictable

    @property
    def locked_size(self) -> int:
        return self._locked

    # ---- helpers ----------------------------------------------------------------------------------
    def _child_key(self, tokens: tuple[int, ...], pos: int) -> int | tuple[int, ...]:
        return tokens[pos] if self.page_size == 1 else tokens[pos : pos + self.page_size]

    def _page_align(self, n: int) -> int:
        return n - n % self.page_size

    def _is_evictable_leaf(self, node: TreeNode) -> bool:
        return node is not self.root and not node.children and node.lock_ref == 0

    def _push(self, node: TreeNode) -> None:
        heapq.heappush(self._heap, (node.last_access, node.id, node))
        # Lazy deletion lets stale entries pile up under match-heavy loads; rebuild when they dominate.
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._heap = [(n.last_access, n.id, n) for n in self._nodes() if self._is_evictable_leaf(n)]
            heapq.heapify(self._heap)

    def _touch(self, node: TreeNode, now: float) -> None:
        """Refresh last_access on node and its ancestors (only node can be a leaf: push just it)."""
        leaf = node
        while node is not self.root:
            node.last_access = now
            node = node.parent  # type: ignore[assignment]
        if self._is_evictable_leaf(leaf):
            self._push(leaf)

    def _split(self, node: TreeNode, k: int) -> TreeNode:
        """Split ``node``'s edge after ``k`` tokens (0 < k < len, page-aligned); return the new upper node."""
        parent = node.parent
        assert parent is not None and 0 < k < len(node.key) and k % self.page_size == 0
        new = TreeNode(node.key[:k], node.value[:k], parent, node.last_access, next(self._ids))
        new.lock_ref = node.lock_ref
        parent.children[self._child_key(node.key, 0)] = new
        node.key = node.key[k:]
        node.value = node.value[k:]
        node.parent = new
        new.children[self._child_key(node.key, 0)] = node
        self._num_nodes += 1
        return new

    def _walk(self, tokens: tuple[int, ...], n: int) -> tuple[TreeNode, list[torch.Tensor], int]:
        """Match ``tokens[:n]`` (n page-aligned) down the tree, splitting at a partial edge match.

        Returns the deepest node reached, the slot runs along the path and the matched length.
        """
        node = self.root
        parts: list[torch.Tensor] = []
        pos = 0
        while pos < n:
            child = node.children.get(self._child_key(tokens, pos))
            if child is None:
                break
            key = child.key
            end = pos + len(key)
            if end <= n and tokens[pos:end] == key:
                c = len(key)
            else:
                # The edge's first token/page matched (dict hit), so c >= page_size after alignment.
                c = self._page_align(min(_common_prefix_len(tokens, pos, key), n - pos))
                if c < len(key):
                    child = self._split(child, c)
            parts.append(child.value)
            node = child
            pos += c
            if c < len(key):
                break
        return node, parts, pos

    # ---- the contract -----------------------------------------------------------------------------
    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        toks = _as_tuple(tokens)
        node, parts, _ = self._walk(toks, self._page_align(len(toks)))
        self._touch(node, next(self._clock))
        return MatchResult(_cat(parts), node)

    def insert(self, tokens: Sequence[int], slots: torch.Tensor) -> InsertResult:
        toks = _as_tuple(tokens)
        n = self._page_align(len(toks))
        if slots.numel() < n:
            raise ValueError(f"insert: {slots.numel()} slots for {n} tokens")
        if n == 0:
            return InsertResult(0, _empty(), self.root)
        slots = slots[:n].to(torch.int64)
        node, parts, matched = self._walk(toks, n)

        # The tree keeps its own slots for tokens it already had; the caller's different ones are freed.
        if matched:
            existing = _cat(parts)
            differs = slots[:matched] != existing
            if bool(differs.any()):
                if self.page_size > 1:
                    per_page = differs.view(-1, self.page_size)
                    if not bool((per_page.all(1) | ~per_page.any(1)).all()):
                        raise RuntimeError(
                            "insert: a passed page shares some but not all slots with the tree"
                        )
                self.pool.free(slots[:matched][differs])

        if matched < n:
            leaf = TreeNode(toks[matched:n], slots[matched:n].clone(), node, node_id=next(self._ids))
            node.children[self._child_key(leaf.key, 0)] = leaf
            self._num_nodes += 1
            self._evictable += n - matched
            parts.append(leaf.value)
            node = leaf
        self._touch(node, next(self._clock))
        return InsertResult(matched, _cat(parts), node)

    def lock(self, node: TreeNode) -> None:
        self._check_attached(node)
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._locked += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: TreeNode) -> None:
        if node is self.root:
            return
        self._check_attached(node)
        # Ancestors' lock_ref >= node's, so checking node alone rules out any negative count.
        if node.lock_ref <= 0:
            raise RuntimeError(f"unlock of an unlocked node {node!r}")
        leaf = node
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._locked -= len(node.key)
            node = node.parent  # type: ignore[assignment]
        if self._is_evictable_leaf(leaf):
            self._push(leaf)

    def evict(self, num_slots: int) -> int:
        freed = 0
        heap = self._heap
        while freed < num_slots and heap:
            ts, _, node = heapq.heappop(heap)
            if node.parent is None or ts != node.last_access or not self._is_evictable_leaf(node):
                continue  # stale entry
            parent = node.parent
            del parent.children[self._child_key(node.key, 0)]
            node.parent = None  # marks the node detached: lock() on a stale handle then fails loudly
            self.pool.free(node.value)
            self._evictable -= len(node.key)
            self._num_nodes -= 1
            freed += len(node.key)
            if self._is_evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

    def reset(self) -> None:
        if self._locked:
            raise RuntimeError(f"reset: {self._locked} slots of the prefix cache are still locked")
        values = [n.value for n in self._nodes()]
        for n in self._nodes():
            n.parent = None
        if values:
            self.pool.free(torch.cat(values))
        self._init_tree()

    # ---- debugging --------------------------------------------------------------------------------
    def _nodes(self) -> Iterator[TreeNode]:
        """Every non-root node, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _check_attached(self, node: TreeNode) -> None:
        if node is not self.root and node.parent is None:
            raise RuntimeError(f"{node!r} is no longer in the tree (evicted or reset)")

    def format_tree(self, max_tokens: int = 12) -> str:
        lines = [f"root  evictable={self._evictable} locked={self._locked}"]

        def visit(node: TreeNode, depth: int) -> None:
            for child in sorted(node.children.values(), key=lambda c: c.key):
                toks = list(child.key[:max_tokens])
                more = f" ...(+{len(child.key) - max_tokens})" if len(child.key) > max_tokens else ""
                slots = child.value[:max_tokens].tolist()
                lines.append(
                    f"{'  ' * depth}- {toks}{more} slots={slots} lock={child.lock_ref} t={child.last_access}"
                )
                visit(child, depth + 1)

        visit(self.root, 1)
        return "\n".join(lines)

    def pretty_print(self) -> None:
        print(self.format_tree())

    def check(self) -> None:
        evictable = locked = 0
        values = []
        page = self.page_size
        for node in self._nodes():
            n = len(node.key)
            parent = node.parent
            assert parent is not None, f"{node!r} reachable but detached"
            assert n > 0, f"empty non-root node {node!r}"
            assert node.value.numel() == n, f"{node!r}: {node.value.numel()} slots for {n} tokens"
            assert node.lock_ref >= 0, f"{node!r}: negative lock_ref"
            assert parent is self.root or parent.lock_ref >= node.lock_ref, (
                f"{node!r}: lock_ref above its parent's {parent.lock_ref}"
            )
            assert parent.children.get(self._child_key(node.key, 0)) is node, (
                f"{node!r}: parent's children key does not match its edge"
            )
            if page > 1:
                assert n % page == 0, f"{node!r}: length {n} not a multiple of page_size {page}"
                pages = node.value.view(-1, page)
                assert bool((pages[:, 0] % page == 0).all()), f"{node!r}: a page run starts mid-page"
                assert bool((pages - pages[:, :1] == torch.arange(page)).all()), (
                    f"{node!r}: a page is not a run"
                )
            assert int(node.value.min()) >= page, f"{node!r}: holds a null-page slot"
            if node.lock_ref:
                locked += n
            else:
                evictable += n
            values.append(node.value)
        assert evictable == self._evictable, f"evictable counter {self._evictable} != recomputed {evictable}"
        assert locked == self._locked, f"locked counter {self._locked} != recomputed {locked}"
        assert len(values) == self._num_nodes, f"node counter {self._num_nodes} != {len(values)} nodes"
        if values:
            allv = torch.cat(values)
            assert torch.unique(allv).numel() == allv.numel(), "a slot is held by the tree twice"
        current = {id(n) for ts, _, n in self._heap if n.parent is not None and ts == n.last_access}
        for node in self._nodes():
            if self._is_evictable_leaf(node):
                assert id(node) in current, f"evictable leaf {node!r} missing from the eviction heap"


class NoPrefixCache(PrefixCache):
    """The null prefix cache (``--disable-radix-cache``): matches nothing and keeps nothing.

    ``insert`` frees ``slots[:n]`` at once, so call it only when a request is done with its KV (finished
    or retracted), never for the computed part of a running request; check ``cache.enabled``.
    """

    enabled = False

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.root = TreeNode()  # the dummy handle every match/insert returns

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        return MatchResult(_empty(), self.root)

    def insert(self, tokens: Sequence[int], slots: torch.Tensor) -> InsertResult:
        n = len(tokens) // self.page_size * self.page_size
        if slots.numel() < n:
            raise ValueError(f"insert: {slots.numel()} slots for {n} tokens")
        self.pool.free(slots[:n])
        return InsertResult(0, _empty(), self.root)

    def lock(self, node: TreeNode) -> None:
        pass

    def unlock(self, node: TreeNode) -> None:
        pass

    def evict(self, num_slots: int) -> int:
        return 0

    def reset(self) -> None:
        pass

    @property
    def evictable_size(self) -> int:
        return 0

    @property
    def locked_size(self) -> int:
        return 0

    def check(self) -> None:
        assert not self.root.children, "NoPrefixCache's dummy node grew children"


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    # Always a fresh tensor: node values are views the caller must not be able to write through.
    if not parts:
        return _empty()
    return parts[0].clone() if len(parts) == 1 else torch.cat(parts)
