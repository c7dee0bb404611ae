"""TorchAttnBackend against a naive reference: one explicit causal softmax per sequence, in float64.

The KV layout is built the way the engine builds it: slots come from KVPool.alloc (whole pages, with the
last, partly filled page continued through `last_slot`), and req_to_token lists them in order. Prefixes
are allocated for every sequence before any extend, so sequences' pages interleave in the pool.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixlm.layers import cpu_kernels
from radixlm.layers.attention_backends.torch_backend import TorchAttnBackend
from radixlm.model.forward_batch import ForwardBatch
from tests.kv_utils import HandPool, HandRows

D = 8


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: int,
    scaling: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """q [n, H, D] at positions prefix..prefix+n-1; k, v [prefix+n, Hkv, D] at positions 0.. -> [n, H, D]."""
    n, H, _ = q.shape
    group = H // k.shape[1]
    out = torch.zeros(n, H, v.shape[-1], dtype=torch.float64)
    for i in range(n):
        pos = prefix + i
        for h in range(H):
            kh, vh = k[:, h // group].double(), v[:, h // group].double()
            scores = (kh @ q[i, h].double()) * scaling
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            for j in range(k.shape[0]):
                if j > pos or (window is not None and pos - j >= window):
                    scores[j] = -math.inf
            out[i, h] = torch.softmax(scores, dim=0) @ vh
    return out


def _pool(capacity: int, page_size: int, num_layers: int, num_kv_heads: int) -> HandPool:
    return HandPool(
        capacity=capacity,
        page_size=page_size,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=D,
        dtype=torch.float32,
    )


def _check(
    spans: list[tuple[int, int]],
    *,
    page_size: int = 1,
    heads: tuple[int, int] = (4, 4),
    window: int | None = None,
    softcap: float | None = None,
    seed: int = 0,
) -> None:
    """spans: (prefix_len, extend_len) per sequence, all computed in one ForwardBatch."""
    H, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    pool = _pool(256, page_size, 2, Hkv)
    req = HandRows(8, 64)
    ks = [torch.randn(p + e, Hkv, D, generator=g) for p, e in spans]
    vs = [torch.randn(p + e, Hkv, D, generator=g) for p, e in spans]
    rows, prefix_slots = [], []
    for (p, _), k, v in zip(spans, ks, vs, strict=True):  # the cached history: earlier steps wrote it
        rows.append(req.alloc())
        slots = pool.alloc(p)
        req.write(rows[-1], 0, slots)
        pool.write(1, slots, k[:p], v[:p])
        prefix_slots.append(slots)
    new_slots = []
    for (p, e), row, pre, k, v in zip(spans, rows, prefix_slots, ks, vs, strict=True):  # this step's tokens
        slots = pool.alloc(e, last_slot=int(pre[-1]) if p else None)
        req.write(row, p, slots)
        pool.write(1, slots, k[p:], v[p:])
        new_slots.append(slots)
    pool.check()
    total = sum(e for _, e in spans)
    fb = ForwardBatch.from_spans(
        input_ids=[0] * total,
        out_cache_loc=torch.cat(new_slots),
        req_pool_indices=rows,
        prefix_lens=[p for p, _ in spans],
        extend_lens=[e for _, e in spans],
        sample_mask=[True] * len(spans),
        kv_pool=pool,
        req_to_token=req.table,
        attn_backend=TorchAttnBackend(),
        device=torch.device("cpu"),
    )
    q = 2 * torch.randn(total, H, D, generator=g)  # large enough that softcap and the mask both matter
    scaling = D**-0.5
    out = fb.attn_backend.forward(q, fb, layer_id=1, scaling=scaling, sliding_window=window, softcap=softcap)
    assert out.shape == (total, H, D)
    # the same step with the new K/V handed over directly (the path RadixAttention takes)
    k_step = torch.cat([k[p:] for (p, _), k in zip(spans, ks, strict=True)])
    v_step = torch.cat([v[p:] for (p, _), v in zip(spans, vs, strict=True)])
    fb.attn_backend.init_forward_metadata(fb)
    direct = fb.attn_backend.forward(
        q, fb, layer_id=1, scaling=scaling, sliding_window=window, softcap=softcap, k=k_step, v=v_step
    )
    torch.testing.assert_close(direct, out, atol=1e-5, rtol=1e-5)
    start = 0
    for (p, e), k, v in zip(spans, ks, vs, strict=True):
        ref = _reference(q[start : start + e], k, v, p, scaling, window, softcap)
        torch.testing.assert_close(out[start : start + e].double(), ref, atol=2e-5, rtol=1e-5)
        start += e


def test_prefill() -> None:
    _check([(0, 11)])


def test_prefill_over_existing_prefix() -> None:
    _check([(7, 5)])


def test_decode_batch() -> None:
    _check([(9, 1), (1, 1), (0, 1), (20, 1)])


def test_mixed_prefill_extend_and_decode() -> None:
    _check([(0, 6), (5, 1), (3, 9), (12, 1), (0, 1)])


@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (6, 3)])
def test_gqa(heads: tuple[int, int]) -> None:
    _check([(0, 7), (4, 1), (2, 5)], heads=heads)


@pytest.mark.parametrize("window", [1, 3, 6])
def test_sliding_window(window: int) -> None:
    _check([(0, 10), (8, 1), (5, 6)], window=window)


def test_softcap() -> None:
    _check([(0, 8), (6, 1), (3, 4)], softcap=2.0)


def test_softcap_with_gqa_and_window() -> None:
    _check([(4, 4), (9, 1)], heads=(4, 2), window=3, softcap=2.0)


@pytest.mark.parametrize("spans", [[(0, 9)], [(3, 6)], [(4, 4), (7, 1), (0, 3)], [(5, 1), (6, 1)]])
def test_page_size_4(spans: list[tuple[int, int]]) -> None:
    _check(spans, page_size=4, heads=(4, 2))


def test_page_size_4_decode_steps_continue_the_last_page() -> None:
    """A sequence decodes one token per step; each step's slot continues the previous step's page."""
    Hkv, H, page = 2, 4, 4
    g = torch.Generator().manual_seed(5)
    pool = _pool(64, page, 1, Hkv)
    req = HandRows(2, 32)
    row = req.alloc()
    k, v = torch.randn(14, Hkv, D, generator=g), torch.randn(14, Hkv, D, generator=g)
    last = None
    for pos in range(14):
        slot = pool.alloc(1, last_slot=last)
        if last is not None and last % page != page - 1:
            assert int(slot) == last + 1  # still inside the page
        last = int(slot)
        req.write(row, pos, slot)
        pool.write(0, slot, k[pos : pos + 1], v[pos : pos + 1])
        fb = ForwardBatch.from_spans(
            input_ids=[0],
            out_cache_loc=slot,
            req_pool_indices=[row],
            prefix_lens=[pos],
            extend_lens=[1],
            sample_mask=[True],
            kv_pool=pool,
            req_to_token=req.table,
            attn_backend=TorchAttnBackend(),
            device=torch.device("cpu"),
        )
        q = torch.randn(1, H, D, generator=g)
        out = fb.attn_backend.forward(q, fb, layer_id=0, scaling=D**-0.5, sliding_window=None, softcap=None)
        ref = _reference(q, k[: pos + 1], v[: pos + 1], pos, D**-0.5, None, None)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert pool.num_used_slots == 16  # 14 tokens in 4 whole pages
    pool.check()


@settings(max_examples=60, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 12), st.integers(1, 9)), min_size=1, max_size=5),
    page_size=st.sampled_from([1, 2, 4]),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 1)]),
    window=st.one_of(st.none(), st.integers(1, 10)),
    softcap=st.one_of(st.none(), st.just(3.0)),
    seed=st.integers(0, 2**16),
)
def test_random_span_layouts(
    spans: list[tuple[int, int]],
    page_size: int,
    heads: tuple[int, int],
    window: int | None,
    softcap: float | None,
    seed: int,
) -> None:
    _check(spans, page_size=page_size, heads=heads, window=window, softcap=softcap, seed=seed)


# ---- decodes that share a cached prefix (shared_prefix.py) ---------------------------------------------


def _check_shared(
    groups: list[tuple[int, list[int]]],
    *,
    extra_spans: list[tuple[int, int]] = (),
    min_shared_prefix: int = 4,
    expect_groups: int | None = None,
    page_size: int = 1,
    heads: tuple[int, int] = (4, 2),
    window: int | None = None,
    softcap: float | None = None,
    seed: int = 0,
    decode_kernel: bool = False,
    flash_kernel: bool = False,
) -> None:
    """groups: (shared prefix length, [own tokens of each member]) -- every member holds the same slots for
    the prefix, as the radix cache hands them out, then `own` private tokens whose last one decodes now.
    extra_spans: unrelated (prefix, extend) spans in the same step. The pool is float32; by default both
    CPU kernels are off (the in-place decode kernel and the flash kernels, cpu_flash_attention.cpp), so
    these tests check the torch form of the groups (the one CUDA, fp8 pools and layers the flash kernel
    does not take run)."""
    H, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    pool = _pool(512, page_size, 1, Hkv)
    req = HandRows(32, 96)

    def kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)

    seqs = []  # (row, prefix_len, extend_len, k, v) per span, in batch order
    for prefix, owns in groups:
        pk, pv = kv(prefix)
        pslots = pool.alloc(prefix)
        pool.write(0, pslots, pk, pv)
        for own in owns:
            row = req.alloc()
            ok, ov = kv(own)
            slots = pool.alloc(own)
            pool.write(0, slots, ok, ov)
            req.write(row, 0, pslots)
            req.write(row, prefix, slots)
            seqs.append((row, prefix + own - 1, 1, torch.cat([pk, ok]), torch.cat([pv, ov])))
    for p, e in extra_spans:
        row = req.alloc()
        k, v = kv(p + e)
        slots = pool.alloc(p + e)
        pool.write(0, slots, k, v)
        req.write(row, 0, slots)
        seqs.append((row, p, e, k, v))
    # interleave the spans so that group members are not adjacent in the batch
    order = list(range(len(seqs)))
    random.Random(seed).shuffle(order)
    seqs = [seqs[i] for i in order]
    total = sum(e for _, _, e, _, _ in seqs)
    backend = TorchAttnBackend(min_shared_prefix=min_shared_prefix)
    kernels_were = cpu_kernels.DECODE_ATTENTION, cpu_kernels.SPAN_ATTENTION
    cpu_kernels.DECODE_ATTENTION, cpu_kernels.SPAN_ATTENTION = decode_kernel, flash_kernel
    try:
        fb = ForwardBatch.from_spans(
            input_ids=[0] * total,
            out_cache_loc=torch.zeros(total, dtype=torch.int64),  # K/V are already in the pool
            req_pool_indices=[s[0] for s in seqs],
            prefix_lens=[s[1] for s in seqs],
            extend_lens=[s[2] for s in seqs],
            sample_mask=[True] * len(seqs),
            kv_pool=pool,
            req_to_token=req.table,
            attn_backend=backend,
            device=torch.device("cpu"),
        )
        shared = fb.attn_metadata.shared
        if expect_groups is not None:
            assert (shared.num_groups if shared is not None else 0) == expect_groups
        q = 2 * torch.randn(total, H, D, generator=g)
        scaling = D**-0.5
        out = backend.forward(q, fb, layer_id=0, scaling=scaling, sliding_window=window, softcap=softcap)
    finally:
        cpu_kernels.DECODE_ATTENTION, cpu_kernels.SPAN_ATTENTION = kernels_were
    start = 0
    for _, p, e, k, v in seqs:
        ref = _reference(q[start : start + e], k, v, p, scaling, window, softcap)
        torch.testing.assert_close(out[start : start + e].double(), ref, atol=2e-5, rtol=1e-5)
        start += e


def test_shared_prefix_decodes_form_one_group() -> None:
    _check_shared([(12, [1, 3, 2, 5])], expect_groups=1)


@pytest.mark.skipif(not cpu_kernels.decode_attention_ok(), reason="radixlm's CPU kernels did not build here")
def test_a_float32_pool_with_the_decode_kernel_but_no_flash_kernel_is_not_grouped() -> None:
    """Without the shared-decode kernel, the torch form of a float32 group measured slower than the
    in-place decode kernel (TorchAttnBackend._groups_pay): the same decodes attend one by one, and are
    still right."""
    _check_shared([(12, [1, 3, 2, 5])], expect_groups=0, decode_kernel=True)


@pytest.mark.skipif(
    not cpu_kernels.span_attention_ok(torch.float32), reason="no float32 flash kernel here (needs AVX-512)"
)
def test_a_float32_pool_with_the_flash_kernel_is_grouped() -> None:
    """With the float32 shared-decode kernel the group reads its prefix once, next to prompt spans the
    span kernel attends, and every row is still right."""
    _check_shared(
        [(70, [1, 3, 2, 5]), (12, [2, 1])],
        extra_spans=[(9, 1), (0, 5), (3, 4)],
        expect_groups=2,
        decode_kernel=True,
        flash_kernel=True,
    )


def test_shared_groups_next_to_singles_and_prompt_spans() -> None:
    _check_shared(
        [(10, [2, 1]), (7, [4, 1, 1])], extra_spans=[(9, 1), (0, 5), (3, 4), (20, 1)], expect_groups=2
    )


def test_prefix_shorter_than_the_threshold_is_not_grouped() -> None:
    _check_shared([(5, [2, 3])], min_shared_prefix=6, expect_groups=0)


def test_a_lone_request_with_a_cached_prefix_is_not_a_group() -> None:
    _check_shared([(12, [3]), (9, [2])], expect_groups=0)


@pytest.mark.parametrize("window", [1, 4, 13])
def test_shared_groups_with_sliding_window(window: int) -> None:
    _check_shared([(10, [3, 1, 6])], extra_spans=[(8, 1)], window=window, expect_groups=1)


def test_shared_groups_with_softcap() -> None:
    _check_shared([(10, [3, 1, 6])], heads=(6, 3), softcap=2.0, expect_groups=1)


def test_shared_groups_page_size_4() -> None:
    _check_shared([(8, [3, 1, 5]), (12, [2, 4])], extra_spans=[(5, 1)], page_size=4, expect_groups=2)


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(
        st.tuples(st.integers(0, 14), st.lists(st.integers(1, 6), min_size=1, max_size=4)),
        min_size=1,
        max_size=4,
    ),
    extra=st.lists(st.tuples(st.integers(0, 10), st.integers(1, 4)), max_size=3),
    min_shared_prefix=st.integers(1, 8),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
    window=st.one_of(st.none(), st.integers(1, 12)),
    softcap=st.one_of(st.none(), st.just(3.0)),
    seed=st.integers(0, 2**16),
)
def test_random_shared_layouts(
    groups: list[tuple[int, list[int]]],
    extra: list[tuple[int, int]],
    min_shared_prefix: int,
    heads: tuple[int, int],
    window: int | None,
    softcap: float | None,
    seed: int,
) -> None:
    # Where all members' own tokens fit under the prefix, a shared prefix makes exactly one group; where
    # they do not, the split is tested in test_find_shared_groups_splits_members_whose_own_tokens_outgrow_the_prefix.
    eligible = [(p, owns) for p, owns in groups if len(owns) > 1 and p >= min_shared_prefix]
    expected = len(eligible) if all(sum(owns) <= p for p, owns in eligible) else None
    _check_shared(
        groups, extra_spans=extra, min_shared_prefix=min_shared_prefix, heads=heads, window=window,
        softcap=softcap, seed=seed, expect_groups=expected,
    )  # fmt: skip


def _slot_table(groups: list[tuple[int, list[int]]]) -> tuple[torch.Tensor, list[int], list[int]]:
    """A req_to_token table where each group's members share `prefix` slots and then own fresh ones."""
    table = torch.zeros(sum(len(o) for _, o in groups), 64, dtype=torch.int64)
    seqs, next_slot, r = [], 1, 0
    for prefix, owns in groups:
        shared = torch.arange(next_slot, next_slot + prefix)
        next_slot += prefix
        for own in owns:
            table[r, :prefix] = shared
            table[r, prefix : prefix + own] = torch.arange(next_slot, next_slot + own)
            next_slot += own
            seqs.append(prefix + own)
            r += 1
    return table, list(range(r)), seqs


def test_find_shared_groups_splits_members_whose_own_tokens_outgrow_the_prefix() -> None:
    from radixlm.layers.attention_backends.shared_prefix import find_shared_groups

    # prefix 5; own tokens 1, 2, 3, 5, 2 -> shortest first: {1, 2, 2} (5 tokens) is a group; 3 and 5 stay alone
    table, rows, seqs = _slot_table([(5, [1, 2, 3, 5, 2]), (8, [1, 1, 1, 1])])
    groups, singles = find_shared_groups(table, rows, seqs, min_prefix=2)
    assert sorted((sorted(m), p) for m, p in groups) == [([0, 1, 4], 5), ([5, 6, 7, 8], 8)]
    assert singles == [2, 3]
    # no two members fit under the prefix together: nothing is grouped
    table, rows, seqs = _slot_table([(4, [3, 3, 3])])
    assert find_shared_groups(table, rows, seqs, min_prefix=2) == ([], [0, 1, 2])


def test_shared_groups_are_planned_from_the_host_table_without_reading_the_device() -> None:
    """The device table on `meta` (reading it back raises), its host copy on the CPU: planning still finds
    the shared group, so a GPU step never syncs to plan it (DESIGN.md: the host never reads the device)."""
    from radixlm.kv.kv_pool import KVPool

    host, rows, seqs = _slot_table([(40, [2, 3, 4])])
    meta = torch.device("meta")
    pool = KVPool(num_pages=512, page_size=1, num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32,
                  device=meta)  # fmt: skip
    with pytest.raises(NotImplementedError):
        host.to(meta).tolist()  # what a device read on this table would do
    fb = ForwardBatch.from_spans(
        input_ids=[0] * len(rows),
        out_cache_loc=torch.zeros(len(rows), dtype=torch.int64),
        req_pool_indices=rows,
        prefix_lens=[n - 1 for n in seqs],
        extend_lens=[1] * len(rows),
        sample_mask=[True] * len(rows),
        kv_pool=pool,
        req_to_token=host.to(meta),
        req_to_token_host=host,
        attn_backend=TorchAttnBackend(min_shared_prefix=32),
        device=meta,
    )
    shared = fb.attn_metadata.shared
    assert shared is not None and shared.num_groups == 1 and shared.max_members == 3
    assert fb.attn_metadata.decode is None  # every decode is in the group


def test_a_device_table_without_its_host_copy_is_refused() -> None:
    host, rows, seqs = _slot_table([(8, [1])])
    with pytest.raises(ValueError, match="req_to_token_host"):
        ForwardBatch.from_spans(
            input_ids=[0], out_cache_loc=[1], req_pool_indices=rows, prefix_lens=[seqs[0] - 1], extend_lens=[1],
            sample_mask=[True], kv_pool=None, req_to_token=host.to("meta"), attn_backend=TorchAttnBackend(),
            device=torch.device("meta"),
        )  # fmt: skip


def test_device_slot_table_keeps_its_host_copy_in_step() -> None:
    from radixlm.kv.req_to_token import DeviceReqToToken

    dev = DeviceReqToToken(3, 8, "meta")
    assert dev.host.device.type == "cpu" and dev.host is not dev.table
    dev.apply([(0, 0, [5, 6, 7]), (2, 3, [9])])
    dev.apply([(0, 1, [8]), (0, 1, [4])])  # one cell twice in a step: the later write wins
    assert dev.host[0, :3].tolist() == [5, 4, 7] and dev.host[2, 3].item() == 9
    cpu = DeviceReqToToken(1, 4, "cpu")
    assert cpu.host is cpu.table
