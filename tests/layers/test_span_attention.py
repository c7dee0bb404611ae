"""radixlm_cpu::span_attention, the bf16 / float32 prompt-span flash attention that reads the KV pool in
place (layers/cpu_flash_attention.cpp): against a float64 reference on scattered slots; a prompt split into
a cached prefix and the rest, or into chunks, gives every query the same bits as the prompt computed whole;
what it refuses; and the torch backend's choice of it (and of SDPA where it does not apply)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixlm.layers import cpu_kernels
from radixlm.layers.attention_backends import torch_backend
from radixlm.layers.attention_backends.torch_backend import TorchAttnBackend
from radixlm.model.forward_batch import ForwardBatch
from tests.kernel_utils import FLASH_SLACK, CountingOps, flash_dtypes, needs_flash_kernels
from tests.kv_utils import HandPool, HandRows

pytestmark = needs_flash_kernels("span_attention")
DTYPES = flash_dtypes("span_attention")
SLACK = FLASH_SLACK


def _pool_rows(
    g: torch.Generator, n_slots: int, Hkv: int, D: int, Dv: int, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(n_slots, Hkv, D, generator=g).to(dtype)
    v = torch.randn(n_slots, Hkv, Dv, generator=g).to(dtype)
    return k, v


def _reference(q, k_buf, v_buf, kv_idx, prefix, scale) -> torch.Tensor:
    """float64 causal attention of q [n, H, D] at positions prefix.. over the slots' rows -> [n, H, Dv]."""
    n, H, _ = q.shape
    G = H // k_buf.shape[1]
    k = k_buf[kv_idx].double().repeat_interleave(G, 1).transpose(0, 1)  # [H, L, D]
    v = v_buf[kv_idx].double().repeat_interleave(G, 1).transpose(0, 1)
    mask = torch.ones(n, prefix + n, dtype=torch.bool).tril(prefix)
    return F.scaled_dot_product_attention(
        q.double().transpose(0, 1), k, v, attn_mask=mask, scale=scale
    ).transpose(0, 1)


# (n, prefix, H, Hkv, D, Dv): one query; grouped heads (7, 4, 3 and 16 per KV head) and none; head dims
# 32 / 64 / 80 / 128 and a 256-wide V; key counts on and off the 64-key blocks; a prefix longer than the span.
SHAPES = [
    (1, 0, 2, 1, 64, 64),
    (5, 0, 14, 2, 64, 64),
    (17, 3, 8, 2, 64, 64),
    (64, 200, 14, 2, 64, 64),
    (33, 40, 4, 4, 128, 128),
    (100, 0, 16, 1, 32, 32),
    (40, 31, 12, 4, 80, 80),
    (9, 60, 4, 1, 256, 256),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_span_attention_matches_the_float64_reference(shape, dtype) -> None:
    """Within the error of torch's own SDPA in that dtype on the same inputs (plus an ulp of the output)."""
    n, prefix, H, Hkv, D, Dv = shape
    g = torch.Generator().manual_seed(n * 31 + prefix)
    k_buf, v_buf = _pool_rows(g, 3 * (prefix + n) + 11, Hkv, D, Dv, dtype)
    kv_idx = torch.randperm(k_buf.shape[0], generator=g)[: prefix + n]
    q = (2 * torch.randn(n, H, D, generator=g)).to(dtype)
    scale = D**-0.5
    got = cpu_kernels.ops().span_attention(q, k_buf, v_buf, kv_idx, prefix, scale)
    assert got.shape == (n, H, Dv) and got.dtype == dtype
    ref = _reference(q, k_buf, v_buf, kv_idx, prefix, scale)
    mask = torch.ones(n, prefix + n, dtype=torch.bool).tril(prefix)
    sdpa = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k_buf[kv_idx].transpose(0, 1)[None],
        v_buf[kv_idx].transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )[0].transpose(0, 1)
    sdpa_err = (sdpa.double() - ref).abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert err <= 2 * sdpa_err + SLACK[dtype], f"max error {err:.3g}, SDPA's {sdpa_err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hkv", [1, 2])
def test_a_query_gets_the_same_bits_however_its_prompt_is_split(Hkv, dtype) -> None:
    """The prefix cache and chunked prefill split a prompt anywhere: each query's row depends only on its
    position and history (whole 64-key blocks from key 0, the rest masked), never on the span it is in."""
    L, H, D = 150, 8, 64
    g = torch.Generator().manual_seed(Hkv)
    k_buf, v_buf = _pool_rows(g, 400, Hkv, D, D, dtype)
    kv_idx = torch.randperm(400, generator=g)[:L]
    q = torch.randn(L, H, D, generator=g).to(dtype)
    ops = cpu_kernels.ops()
    whole = ops.span_attention(q, k_buf, v_buf, kv_idx, 0, D**-0.5)
    for cuts in ([1], [63, 64], [64], [100], [149], [17, 80, 130]):
        bounds = [0, *cuts, L]
        parts = [
            ops.span_attention(q[a:b].contiguous(), k_buf, v_buf, kv_idx[:b], a, D**-0.5)
            for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        assert torch.equal(torch.cat(parts), whole), f"split at {cuts}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_span_attention_refuses_what_it_was_not_built_for(dtype) -> None:
    ops = cpu_kernels.ops()
    g = torch.Generator().manual_seed(0)
    k_buf, v_buf = _pool_rows(g, 20, 2, 64, 64, dtype)
    q = torch.randn(4, 4, 64, generator=g).to(dtype)
    idx = torch.arange(6)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match="all bf16 or all float32"):
        ops.span_attention(q.to(other), k_buf, v_buf, idx, 2, 0.125)
    with pytest.raises(RuntimeError, match="all bf16 or all float32"):
        ops.span_attention(q.half(), k_buf.half(), v_buf.half(), idx, 2, 0.125)
    with pytest.raises(RuntimeError, match="prefix \\+ n = 6 slots, got 5"):
        ops.span_attention(q, k_buf, v_buf, idx[:5], 2, 0.125)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.span_attention(q, k_buf, v_buf[:, :, :40].contiguous(), idx, 2, 0.125)
    with pytest.raises(RuntimeError, match="head shapes"):
        ops.span_attention(torch.randn(4, 3, 64).to(dtype), k_buf, v_buf, idx, 2, 0.125)
    lower, needs = ("avx512", "AVX512_BF16") if dtype == torch.bfloat16 else ("avx2", "AVX-512")
    with cpu_kernels.pinned_isa(lower), pytest.raises(RuntimeError, match=needs):
        ops.span_attention(q, k_buf, v_buf, idx, 2, 0.125)


def test_float32_span_attention_runs_at_the_avx512_level() -> None:
    """float32 needs AVX-512 only: pinned below AVX512_BF16 it still runs, with the same bits."""
    ops = cpu_kernels.ops()
    g = torch.Generator().manual_seed(3)
    k_buf, v_buf = _pool_rows(g, 90, 2, 64, 64, torch.float32)
    q = torch.randn(20, 8, 64, generator=g)
    idx = torch.randperm(90, generator=g)[:50]
    top = ops.span_attention(q, k_buf, v_buf, idx, 30, 0.125)
    with cpu_kernels.pinned_isa("avx512"):
        assert torch.equal(ops.span_attention(q, k_buf, v_buf, idx, 30, 0.125), top)


def _backend_step(spans, H, Hkv, D, *, window=None, softcap=None, seed=0, dtype=torch.bfloat16):
    """One ForwardBatch of (prefix, extend) prompt spans through TorchAttnBackend -> (out, fb)."""
    g = torch.Generator().manual_seed(seed)
    pool = HandPool(capacity=512, page_size=1, num_layers=1, num_kv_heads=Hkv, head_dim=D, dtype=dtype)
    req = HandRows(8, 256)
    rows, new_slots, ks, vs = [], [], [], []
    for p, e in spans:
        k = torch.randn(p + e, Hkv, D, generator=g).to(dtype)
        v = torch.randn(p + e, Hkv, D, generator=g).to(dtype)
        rows.append(req.alloc())
        slots = pool.alloc(p + e)
        req.write(rows[-1], 0, slots)
        pool.write(0, slots, k, v)
        new_slots.append(slots[p:])
        ks.append(k)
        vs.append(v)
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
    q = (2 * torch.randn(total, H, D, generator=g)).to(dtype)
    out = fb.attn_backend.forward(q, fb, layer_id=0, scaling=D**-0.5, sliding_window=window, softcap=softcap)
    return out, fb


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_torch_backend_attends_prompt_spans_with_the_kernel(monkeypatch, dtype) -> None:
    """Prompt spans (with and without a cached prefix, next to a decode) go to the kernel, and its rows are
    those SDPA gives up to rounding; SPAN_ATTENTION off takes the SDPA path."""
    spans = [(0, 40), (70, 9), (12, 1)]
    counting = CountingOps("span_attention", lambda q, *rest: q.shape[0])
    ops = cpu_kernels.ops
    monkeypatch.setattr(cpu_kernels, "ops", lambda: counting)
    with_kernel, fb = _backend_step(spans, 14, 2, 64, dtype=dtype)
    assert fb.attn_metadata.span_kernel and counting.calls == [40, 9]  # the decode goes to decode_attention
    monkeypatch.setattr(cpu_kernels, "ops", ops)
    monkeypatch.setattr(cpu_kernels, "SPAN_ATTENTION", False)
    without, fb = _backend_step(spans, 14, 2, 64, dtype=dtype)
    assert not fb.attn_metadata.span_kernel
    tolerance = 2**-6 if dtype == torch.bfloat16 else 1e-5
    assert (with_kernel.float() - without.float()).abs().max().item() <= tolerance


@pytest.mark.parametrize(
    ("window", "softcap", "heads"),
    [(16, None, (4, 2)), (None, 30.0, (4, 2)), (None, None, (20, 1))],
)
def test_layers_the_kernel_does_not_cover_keep_sdpa(monkeypatch, window, softcap, heads) -> None:
    """A sliding window, a softcap, more than 16 query heads per KV head: the kernel is not called."""

    def refuse(*args):
        raise AssertionError("span_attention was called")

    class NoSpan:
        def __getattr__(self, name):
            return getattr(real_ops, name)

        span_attention = staticmethod(refuse)

    real_ops = cpu_kernels.ops()
    monkeypatch.setattr(cpu_kernels, "ops", lambda: NoSpan())
    out, _ = _backend_step([(5, 30)], heads[0], heads[1], 64, window=window, softcap=softcap)
    assert out.shape == (30, heads[0], 64)


def test_span_kernel_conditions() -> None:
    q = torch.zeros(3, 8, 64, dtype=torch.bfloat16)
    kb = torch.zeros(10, 2, 64, dtype=torch.bfloat16)
    sp = torch_backend._ExtendSpan(0, 3, 0, torch.arange(3))
    plain, full = torch_backend._Scores(0.125), torch_backend._Window()
    assert torch_backend._span_kernel_ok(q, kb, kb, sp, plain, full)
    assert torch_backend._span_kernel_ok(q.float(), kb.float(), kb.float(), sp, plain, full)
    assert not torch_backend._span_kernel_ok(q.half(), kb.half(), kb.half(), sp, plain, full)
    assert not torch_backend._span_kernel_ok(q.float(), kb, kb, sp, plain, full)
    assert not torch_backend._span_kernel_ok(q, kb.to(torch.float8_e4m3fn), kb, sp, plain, full)
    assert not torch_backend._span_kernel_ok(q, kb, kb, sp, plain, torch_backend._Window(chunk=8))
    assert not torch_backend._span_kernel_ok(
        q, kb, kb, torch_backend._ExtendSpan(0, 3, 0, torch.arange(3), blocks=((0, 2),)), plain, full
    )
    assert not torch_backend._span_kernel_ok(q, kb, kb[:, :, :40], sp, plain, full)  # V width not by 16
