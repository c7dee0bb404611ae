"""fork(8) after a 1,000-token prefix: the prefix is computed once, and every branch finds it in the radix
cache (its cached_tokens covers the whole prefix). Measured with the engine's own counter of computed
tokens (get_server_info()["num_tokens_computed"]), on both backends."""

from __future__ import annotations

from radixlm import lang as sgl
from radixlm.lang.backend import Backend

WORDS = "river music paper field color money power market system program question number family".split()
BRANCHES = 8
NEW_TOKENS = 4


def _prefix(backend: Backend, min_tokens: int = 1000) -> str:
    text, i = "Notes.", 0
    while len(backend.tokenize([text])[0]) < min_tokens:
        text += f" {WORDS[i % len(WORDS)]} {i}."
        i += 1
    return text


@sgl.function
def branches(s, prefix):
    s += prefix
    forks = s.fork(BRANCHES)
    forks += lambda i: f"\nBranch {i}:"
    forks += sgl.gen("out", max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    s["cached"] = [f.get_meta_info("out")["cached_tokens"] for f in forks]
    s["prompt_tokens"] = [f.get_meta_info("out")["prompt_tokens"] for f in forks]
    forks.join()


def test_fork_computes_the_prefix_once(backend: Backend) -> None:
    prefix = _prefix(backend)
    prefix_ids = backend.tokenize([prefix])[0]
    p = len(prefix_ids)
    branch_ids = backend.tokenize([prefix + f"\nBranch {i}:" for i in range(BRANCHES)])
    assert all(ids[:p] == prefix_ids for ids in branch_ids)  # the boundary does not merge: cacheable as is
    assert backend.flush_cache()
    before = backend.get_server_info()["num_tokens_computed"]
    st = branches.run(prefix=prefix, backend=backend)
    computed = backend.get_server_info()["num_tokens_computed"] - before
    assert len(st["out"]) == BRANCHES
    assert all(c >= p for c in st["cached"]), (st["cached"], p)
    # Once: the prefix, then each branch's own prompt tokens and its decode steps (the last sampled token
    # is never fed back, and a branch's first prompt token past the cache is where its own part begins).
    own = sum(len(ids) - p for ids in branch_ids)
    assert computed <= p + own + BRANCHES * NEW_TOKENS, (computed, p, own)
    # And the counter measures something: the prefix, and at least each branch's last prompt token and its
    # decode steps (the branches' common "\nBranch" tokens are themselves shared through the cache).
    assert computed >= p + BRANCHES * NEW_TOKENS
