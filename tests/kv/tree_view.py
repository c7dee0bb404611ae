"""Read a RadixCache's content straight from its nodes (no match, so no recency or split side effects), as
the plain-dict model the cache tests compare it with.

The model maps every stored page prefix ``tokens[:(i+1)*P]`` to the slots of its last page (P = page_size;
one token per page when P = 1): all the observable content of a radix tree. (Per-token prefixes would not
do for P > 1: pages [0 0 0 0] and [0 0 0 1] are different children that share the token prefix [0 0 0].)
"""

from __future__ import annotations

from radixlm.kv.prefix_cache import PrefixCache
from radixlm.kv.radix_cache import RadixCache, TreeNode

Model = dict[tuple[int, ...], tuple[int, ...]]


def tree_nodes(cache: PrefixCache) -> list[tuple[tuple[int, ...], TreeNode]]:
    """(the tokens before the node's edge, node) for every non-root node; [] for a cache without a tree."""
    if not isinstance(cache, RadixCache):
        return []
    out = []
    stack: list[tuple[TreeNode, tuple[int, ...]]] = [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            out.append((prefix, child))
            stack.append((child, prefix + tuple(child.key)))
    return out


def tree_items(cache: PrefixCache) -> Model:
    """Page prefix -> slots of its last page."""
    page = cache.page_size
    out: Model = {}
    for prefix, node in tree_nodes(cache):
        p = prefix
        for i in range(0, len(node.key), page):
            p = p + tuple(node.key[i : i + page])
            out[p] = tuple(node.value[i : i + page])
    return out


def locked_prefixes(cache: PrefixCache) -> set[tuple[int, ...]]:
    """The page prefixes whose node is locked."""
    page = cache.page_size
    out = set()
    for prefix, node in tree_nodes(cache):
        if node.lock_ref:
            for i in range(0, len(node.key), page):
                out.add(prefix + tuple(node.key[: i + page]))
    return out


def node_depth(node: TreeNode) -> int:
    """Tokens from the root to the end of node's edge."""
    n = 0
    while node.parent is not None:
        n += len(node.key)
        node = node.parent
    return n


def longest_match(model: Model, toks: tuple[int, ...], page: int) -> int:
    length = 0
    while length + page <= len(toks) and toks[: length + page] in model:
        length += page
    return length


def model_slots(model: Model, toks: tuple[int, ...], length: int, page: int) -> list[int]:
    return [s for i in range(0, length, page) for s in model[toks[: i + page]]]
