"""RadixCache: RadixAttention's prefix cache, a radix tree over token ids whose nodes hold KV pool slots.

It implements the PrefixCache contract (prefix_cache.py): it never frees or allocates; slots it gives up are
returned to KVManager, and slots are host ints (a node's ``value`` is a list).

Tree shape
----------
The root has an empty edge. A node's ``key`` is the token run on the edge from its parent; the tokens of
a node are its ancestors' keys concatenated with its own. Children are keyed by the first token of their
edge (``page_size == 1``) or by the tuple of the first page's tokens (``page_size > 1``), so two children
never share a first token/page and a lookup is one dict access per edge. With ``page_size > 1`` the tree
stores whole pages only, so every node's value is a run of complete pages.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence

from radixlm.kv.prefix_cache import CacheHandle, InsertResult, MatchResult, PrefixCache

_CHUNK = 64  # token run compared at once when looking for the first mismatch


def _as_tuple(tokens: Sequence[int]) -> tuple[int, ...]:
    # Tuples give C-speed slice comparison.
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
    """One edge of the radix tree: ``key`` (token ids) and ``value`` (their KV slots)."""

    __slots__ = ("key", "value", "children", "parent", "lock_ref", "last_access", "id")

    def __init__(
        self,
        key: tuple[int, ...] = (),
        value: list[int] | None = None,
        parent: TreeNode | None = None,
        last_access: float = 0.0,
        node_id: int = 0,
    ) -> None:
        self.key = key
        self.value: list[int] = [] if value is None else value
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


class RadixCache(PrefixCache):
    """A radix tree of token runs whose nodes hold the pool slots of their edge.

    A split at ``k`` (page-aligned) turns one node into two, keeping the lower node's identity so that
    handles held by running requests (and its heap entry) stay valid::

        before:   parent --[a b c d e f]--> node --> children
        after:    parent --[a b c]--> new --[d e f]--> node --> children

    ``new`` takes ``node``'s lock_ref and last_access, so sizes and lock counts are unchanged.
    """

    shares_prefixes = True

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._clock = itertools.count(1)  # last_access values: a deterministic logical clock
        self._ids = itertools.count(1)
        self._init_tree()

    def _init_tree(self) -> None:
        self._root = TreeNode()  # empty edge; never locked, counted or evicted
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
        return node is not self._root and not node.children and node.lock_ref == 0

    def _push(self, node: TreeNode) -> None:
        heapq.heappush(self._heap, (node.last_access, node.id, node))
        # Lazy deletion lets stale entries pile up under match-heavy loads; rebuild when they dominate.
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._heap = [(n.last_access, n.id, n) for n in self._nodes() if self._is_evictable_leaf(n)]
            heapq.heapify(self._heap)

    def _touch(self, node: TreeNode, now: float) -> None:
        """Refresh last_access on node and its ancestors (only node can be a leaf: push just it)."""
        leaf = node
        while node is not self._root:
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

    def _walk(self, tokens: tuple[int, ...], n: int) -> tuple[TreeNode, list[list[int]], int]:
        """Match ``tokens[:n]`` (n page-aligned) down the tree, splitting at a partial edge match.

        Returns the deepest node reached, the slot runs along the path and the matched length.
        """
        node = self._root
        parts: list[list[int]] = []
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
    def match(self, tokens: Sequence[int]) -> MatchResult:
        toks = _as_tuple(tokens)
        node, parts, _ = self._walk(toks, self._page_align(len(toks)))
        self._touch(node, next(self._clock))
        return MatchResult(_cat(parts), node)

    def insert(self, tokens: Sequence[int], slots: Sequence[int]) -> InsertResult:
        toks = _as_tuple(tokens)
        n = self._page_align(len(toks))
        if len(slots) < n:
            raise ValueError(f"insert: {len(slots)} slots for {n} tokens")
        if n == 0:
            return InsertResult([], self._root)
        node, parts, matched = self._walk(toks, n)
        if self.page_size > 1 and matched:
            self._check_whole_pages(_cat(parts), slots)
        if matched < n:
            leaf = TreeNode(toks[matched:n], list(slots[matched:n]), node, node_id=next(self._ids))
            node.children[self._child_key(leaf.key, 0)] = leaf
            self._num_nodes += 1
            self._evictable += n - matched
            parts.append(leaf.value)
            node = leaf
        self._touch(node, next(self._clock))
        return InsertResult(_cat(parts), node)

    def _check_whole_pages(self, existing: list[int], slots: Sequence[int]) -> None:
        # A page the caller passes is either the tree's own or entirely the caller's: freeing a duplicate
        # page must never free a slot the tree holds.
        page = self.page_size
        for start in range(0, len(existing), page):
            same = [a == b for a, b in zip(existing[start : start + page], slots[start : start + page])]
            if any(same) and not all(same):
                raise RuntimeError("insert: a passed page shares some but not all slots with the tree")

    @property
    def root(self) -> CacheHandle:
        return self._root

    def parent(self, handle: CacheHandle) -> CacheHandle | None:
        return handle.parent

    def children(self, handle: CacheHandle) -> list[CacheHandle]:
        return list(handle.children.values())

    def lock(self, node: TreeNode) -> None:
        self._check_attached(node)
        while node is not self._root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._locked += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: TreeNode) -> None:
        if node is self._root:
            return
        self._check_attached(node)
        # Ancestors' lock_ref >= node's, so checking node alone rules out any negative count.
        if node.lock_ref <= 0:
            raise RuntimeError(f"unlock of an unlocked node {node!r}")
        leaf = node
        while node is not self._root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._locked -= len(node.key)
            node = node.parent  # type: ignore[assignment]
        if self._is_evictable_leaf(leaf):
            self._push(leaf)

    def evict(self, num_slots: int) -> list[int]:
        given_up: list[int] = []
        freed = 0
        heap = self._heap
        while freed < num_slots and heap:
            ts, _, node = heapq.heappop(heap)
            if node.parent is None or ts != node.last_access or not self._is_evictable_leaf(node):
                continue  # stale entry
            parent = node.parent
            del parent.children[self._child_key(node.key, 0)]
            node.parent = None  # marks the node detached: lock() on a stale handle then fails loudly
            given_up.extend(node.value)
            self._evictable -= len(node.key)
            self._num_nodes -= 1
            freed += len(node.key)
            if self._is_evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return given_up

    def reset(self) -> list[int]:
        if self._locked:
            raise RuntimeError(f"reset: {self._locked} slots of the prefix cache are still locked")
        nodes = list(self._nodes())
        given_up = [s for n in nodes for s in n.value]
        for n in nodes:
            n.parent = None
        self._init_tree()
        return given_up

    # ---- debugging --------------------------------------------------------------------------------
    def _nodes(self) -> Iterator[TreeNode]:
        """Every non-root node, parents before children."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _check_attached(self, node: TreeNode) -> None:
        if node is not self._root and node.parent is None:
            raise RuntimeError(f"{node!r} is no longer in the tree (evicted or reset)")

    def format_tree(self, max_tokens: int = 12) -> str:
        lines = [f"root  evictable={self._evictable} locked={self._locked}"]

        def visit(node: TreeNode, depth: int) -> None:
            for child in sorted(node.children.values(), key=lambda c: c.key):
                toks = list(child.key[:max_tokens])
                more = f" ...(+{len(child.key) - max_tokens})" if len(child.key) > max_tokens else ""
                slots = child.value[:max_tokens]
                lines.append(
                    f"{'  ' * depth}- {toks}{more} slots={slots} lock={child.lock_ref} t={child.last_access}"
                )
                visit(child, depth + 1)

        visit(self._root, 1)
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
            assert len(node.value) == n, f"{node!r}: {len(node.value)} slots for {n} tokens"
            assert node.lock_ref >= 0, f"{node!r}: negative lock_ref"
            assert parent is self._root or parent.lock_ref >= node.lock_ref, (
                f"{node!r}: lock_ref above its parent's {parent.lock_ref}"
            )
            assert parent.children.get(self._child_key(node.key, 0)) is node, (
                f"{node!r}: parent's children key does not match its edge"
            )
            if page > 1:
                assert n % page == 0, f"{node!r}: length {n} not a multiple of page_size {page}"
                for start in range(0, n, page):
                    first = node.value[start]
                    assert first % page == 0, f"{node!r}: a page run starts mid-page"
                    assert node.value[start : start + page] == list(range(first, first + page)), (
                        f"{node!r}: a page is not a run"
                    )
            assert min(node.value) >= page, f"{node!r}: holds a null-page slot"
            if node.lock_ref:
                locked += n
            else:
                evictable += n
            values.append(node.value)
        assert evictable == self._evictable, f"evictable counter {self._evictable} != recomputed {evictable}"
        assert locked == self._locked, f"locked counter {self._locked} != recomputed {locked}"
        assert len(values) == self._num_nodes, f"node counter {self._num_nodes} != {len(values)} nodes"
        all_slots = [s for v in values for s in v]
        assert len(set(all_slots)) == len(all_slots), "a slot is held by the tree twice"
        current = {id(n) for ts, _, n in self._heap if n.parent is not None and ts == n.last_access}
        for node in self._nodes():
            if self._is_evictable_leaf(node):
                assert id(node) in current, f"evictable leaf {node!r} missing from the eviction heap"


def _cat(parts: list[list[int]]) -> list[int]:
    # Always a fresh list: the caller must not be able to write into a node's value.
    out: list[int] = []
    for part in parts:
        out.extend(part)
    return out
