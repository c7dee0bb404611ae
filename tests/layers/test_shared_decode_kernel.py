"""radixlm_cpu::shared_decode_attention, the bf16 / float32 kernel for decodes that share a cached prefix
(layers/cpu_flash_attention.cpp; groups from attention_backends/shared_prefix.py): each member against a
float64 reference of its own history, over groups that span several tasks, own keys on and off the 64-key
blocks and padding members; what it refuses; and the torch backend's use of it for shared groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixlm.layers import cpu_kernels
from radixlm.layers.attention_backends.torch_backend import TorchAttnBackend
from radixlm.model.forward_batch import ForwardBatch
from tests.kernel_utils import FLASH_SLACK, CountingOps, flash_dtypes, needs_flash_kernels
from tests.kv_utils import HandPool, HandRows

pytestmark = needs_flash_kernels("shared_decode_attention")
DTYPES = flash_dtypes("shared_decode_attention")
SLACK = FLASH_SLACK
ROUNDING = {torch.bfloat16: 2**-6, torch.float32: 1e-5}  # two computations of one row in the dtype


def _groups(g: torch.Generator, spec: list[tuple[int, list[int]]], kmax: int, n_slots: int, T: int):
    """spec: (prefix length, [own keys of each member]) per group -> the kernel's index tensors, each
    member's key slots, and its query token (a random distinct token of T)."""
    perm = torch.randperm(n_slots, generator=g).tolist()
    tokens = torch.randperm(T, generator=g).tolist()
    lmax = max(p + sum(owns) for p, owns in spec)
    kv_idx = torch.zeros(len(spec), lmax, dtype=torch.int64)
    token_idx = torch.zeros(len(spec), kmax, dtype=torch.int64)
    own_lens = torch.zeros(len(spec), kmax, dtype=torch.int64)
    members = []  # (group, j, query token, slots)
    for gi, (p, owns) in enumerate(spec):
        prefix = [perm.pop() for _ in range(p)]
        kv_idx[gi, :p] = torch.tensor(prefix)
        col = p
        for j, n in enumerate(owns):
            own = [perm.pop() for _ in range(n)]
            kv_idx[gi, col : col + n] = torch.tensor(own)
            col += n
            token_idx[gi, j] = tokens.pop()
            own_lens[gi, j] = n
            members.append((gi, j, int(token_idx[gi, j]), torch.tensor(prefix + own)))
    prefix_lens = torch.tensor([p for p, _ in spec], dtype=torch.int64)
    return token_idx, kv_idx, prefix_lens, own_lens, members


def _attend(q1: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query [H, D] over its whole history k / v [L, Hkv, D] -> [H, Dv], in q1's dtype."""
    G = q1.shape[0] // k.shape[1]
    kh = k.repeat_interleave(G, 1).transpose(0, 1)  # [H, L, D]
    vh = v.repeat_interleave(G, 1).transpose(0, 1)
    return F.scaled_dot_product_attention(q1[:, None], kh, vh, scale=scale)[:, 0]


# (spec, H, Hkv, D): two groups of few members; 40 members of 7 heads (more rows than one task holds);
# own keys past a 64-key block; one KV head for every query head; 128-dim heads; padding members.
CASES = [
    ([(70, [1, 3]), (12, [5, 1, 2])], 14, 2, 64),
    ([(100, [1 + i % 5 for i in range(40)])], 14, 2, 64),
    ([(64, [65, 1, 130])], 8, 2, 64),
    ([(33, [2, 2])], 4, 4, 128),
    ([(5, [1, 9]), (200, [3])], 16, 1, 32),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("spec", "H", "Hkv", "D"), CASES)
def test_shared_decode_attention_matches_each_members_own_attention(spec, H, Hkv, D, dtype) -> None:
    """Within twice the error of torch's SDPA in the dtype per member (plus an ulp of the output); padding
    rows 0."""
    g = torch.Generator().manual_seed(H * 7 + len(spec))
    kmax = max(len(owns) for _, owns in spec) + 1  # one padding member per group at least
    n_slots = sum(p + sum(owns) for p, owns in spec) + 17
    k_buf = torch.randn(n_slots, Hkv, D, generator=g).to(dtype)
    v_buf = torch.randn(n_slots, Hkv, D, generator=g).to(dtype)
    T = sum(len(owns) for _, owns in spec) + 5
    q = (2 * torch.randn(T, H, D, generator=g)).to(dtype)
    token_idx, kv_idx, prefix_lens, own_lens, members = _groups(g, spec, kmax, n_slots, T)
    scale = D**-0.5
    out = cpu_kernels.ops().shared_decode_attention(
        q, k_buf, v_buf, token_idx, kv_idx, prefix_lens, own_lens, scale
    )
    assert out.shape == (len(spec) * kmax, H, D) and out.dtype == dtype
    real = set()
    for gi, j, tok, slots in members:
        real.add(gi * kmax + j)
        ref = _attend(q[tok].double(), k_buf[slots].double(), v_buf[slots].double(), scale)
        sdpa = _attend(q[tok], k_buf[slots], v_buf[slots], scale)
        err = (out[gi * kmax + j].double() - ref).abs().max().item()
        sdpa_err = (sdpa.double() - ref).abs().max().item()
        assert err <= 2 * sdpa_err + SLACK[dtype], f"group {gi} member {j}: {err:.3g}, SDPA's {sdpa_err:.3g}"
    padding = [r for r in range(out.shape[0]) if r not in real]
    assert padding and not out[padding].any()


def test_shared_decode_attention_refuses_bad_indices() -> None:
    ops = cpu_kernels.ops()
    k_buf = torch.zeros(20, 2, 64, dtype=torch.bfloat16)
    q = torch.zeros(3, 4, 64, dtype=torch.bfloat16)
    tok = torch.tensor([[0, 1]])
    idx = torch.arange(10)[None]
    own = torch.tensor([[2, 3]])
    with pytest.raises(RuntimeError, match="prefix_lens\\[0\\] must be positive"):
        ops.shared_decode_attention(q, k_buf, k_buf, tok, idx, torch.tensor([0]), own, 0.125)
    with pytest.raises(RuntimeError, match="holds 11 keys, kv_idx has 10"):
        ops.shared_decode_attention(q, k_buf, k_buf, tok, idx, torch.tensor([6]), own, 0.125)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.shared_decode_attention(q, k_buf, k_buf, tok, idx + 15, torch.tensor([4]), own, 0.125)
    with pytest.raises(RuntimeError, match="member 1 of group 0"):
        ops.shared_decode_attention(
            q, k_buf, k_buf, torch.tensor([[0, 3]]), idx, torch.tensor([4]), own, 0.125
        )
    with pytest.raises(RuntimeError, match="all bf16 or all float32"):
        ops.shared_decode_attention(q.float(), k_buf, k_buf, tok, idx, torch.tensor([4]), own, 0.125)
    with cpu_kernels.pinned_isa("avx2"), pytest.raises(RuntimeError, match="AVX-512"):
        ops.shared_decode_attention(
            q.float(), k_buf.float(), k_buf.float(), tok, idx, torch.tensor([4]), own, 0.1
        )


def _shared_step(
    groups: list[tuple[int, list[int]]], H: int, Hkv: int, D: int, seed: int = 0, dtype=torch.bfloat16
):
    """One decode step whose members share their group's prefix slots (as the radix cache hands them
    out) through TorchAttnBackend -> (out, q, each span's k / v history, the ForwardBatch)."""
    g = torch.Generator().manual_seed(seed)
    pool = HandPool(capacity=1024, page_size=1, num_layers=1, num_kv_heads=Hkv, head_dim=D, dtype=dtype)
    req = HandRows(32, 512)
    rows, lens, hist = [], [], []
    for prefix, owns in groups:
        pk = torch.randn(prefix, Hkv, D, generator=g).to(dtype)
        pv = torch.randn(prefix, Hkv, D, generator=g).to(dtype)
        pslots = pool.alloc(prefix)
        pool.write(0, pslots, pk, pv)
        for own in owns:
            ok = torch.randn(own, Hkv, D, generator=g).to(dtype)
            ov = torch.randn(own, Hkv, D, generator=g).to(dtype)
            slots = pool.alloc(own)
            pool.write(0, slots, ok, ov)
            rows.append(req.alloc())
            req.write(rows[-1], 0, pslots)
            req.write(rows[-1], prefix, slots)
            lens.append(prefix + own - 1)
            hist.append((torch.cat([pk, ok]), torch.cat([pv, ov])))
    fb = ForwardBatch.from_spans(
        input_ids=[0] * len(rows),
        out_cache_loc=torch.zeros(len(rows), dtype=torch.int64),  # K/V are already in the pool
        req_pool_indices=rows,
        prefix_lens=lens,
        extend_lens=[1] * len(rows),
        sample_mask=[True] * len(rows),
        kv_pool=pool,
        req_to_token=req.table,
        attn_backend=TorchAttnBackend(),
        device=torch.device("cpu"),
    )
    q = (2 * torch.randn(len(rows), H, D, generator=g)).to(dtype)
    out = fb.attn_backend.forward(q, fb, layer_id=0, scaling=D**-0.5, sliding_window=None, softcap=None)
    return out, q, hist, fb


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_torch_backend_attends_shared_groups_with_the_kernel(monkeypatch, dtype) -> None:
    """Two groups (and the kernel called once for both); every member's row is its own attention up to
    rounding; SPAN_ATTENTION off takes another path (bf16: the padded SDPA form; float32: ungrouped, the
    in-place decode kernel), with the same rows up to rounding."""
    groups = [(80, [1, 4, 2]), (100, [3, 1])]
    counting = CountingOps("shared_decode_attention", lambda q, k, v, token_idx, *rest: token_idx.shape[0])
    ops = cpu_kernels.ops
    monkeypatch.setattr(cpu_kernels, "ops", lambda: counting)
    with_kernel, q, hist, fb = _shared_step(groups, 14, 2, 64, dtype=dtype)
    assert fb.attn_metadata.shared is not None and counting.calls == [2]
    for i, (k, v) in enumerate(hist):
        ref = _attend(q[i].double(), k.double(), v.double(), 64**-0.5)
        assert (with_kernel[i].double() - ref).abs().max().item() <= ROUNDING[dtype]
    monkeypatch.setattr(cpu_kernels, "ops", ops)
    monkeypatch.setattr(cpu_kernels, "SPAN_ATTENTION", False)
    without, _, _, fb = _shared_step(groups, 14, 2, 64, dtype=dtype)
    assert (fb.attn_metadata.shared is None) == (dtype == torch.float32)
    assert (with_kernel.float() - without.float()).abs().max().item() <= ROUNDING[dtype]
