"""The torch attention backend: runs on any device, and is the reference the GPU kernels are tested against.

Spans fall into three kinds, attended differently because their shapes differ so much that padding one to
another wastes most of the work:

- decodes (one output token each) form one group. On a CPU where radixlm's kernels built
  (layers/cpu_kernels.cpp), plain softmax layers read each history in place from the pool
  (`decode_attention`: no copy, no padding); otherwise every span's KV history is gathered and padded to
  the longest:

      q       [B, H, D]           gathered from the packed queries
      kv_idx  [B, Lmax]           = req_to_token[row, :Lmax]  (slot 0, the null page, past each seq_len)
      mask    [B, 1, 1, Lmax]     inside the sequence (and inside the window)

- decodes that share a long cached prefix with other decodes form shared groups that read that prefix
  once (shared_prefix.py);
- prompt spans are attended one at a time (a handful per step), each against its own history; a
  one-token span over a prompt token is one of them, not a decode (ForwardBatch.prompt_singles). With a
  bf16 pool on a CPU with AVX512_BF16, or a float32 pool on one with AVX-512, plain causal layers read the
  pool in place (`span_attention`, flash attention); otherwise SDPA over the span's gathered K/V.

Everything is built once per step (`init_forward_metadata`); each layer only gathers its own K/V and runs
one scaled-dot-product attention per group. No Python loop over tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from radixlm.layers import cpu_kernels
from radixlm.layers.attention_backends.base import AttentionBackend
from radixlm.layers.attention_backends.bidirectional import BidirectionalPlan, attend_bidirectional

if TYPE_CHECKING:
    from radixlm.model.forward_batch import ForwardBatch
from radixlm.layers.attention_backends.shared_prefix import (
    SharedDecodeGroups,
    build_shared_groups,
    find_shared_groups,
)

# A short shared prefix saves little reading and still costs the group's padding and masking. 64 is a
# judgement, not a measured break-even point.
DEFAULT_MIN_SHARED_PREFIX = 64


@dataclass
class _DecodeGroup:
    """Decode spans (one query each, at its sequence's last position), padded to the longest history."""

    token_idx: torch.Tensor | None  # [B] packed token index of each query; None: every token, in order
    kv_idx: torch.Tensor  # [B, Lmax] KV slots (slot 0, the null page, past each seq_len)
    seq_lens: torch.Tensor  # [B]
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    # cpu_kernels' decode attention is built and switched on: asked once a step, not once a layer (the
    # switch reads the environment: ~15 us a layer, measured as 1 ms of a 45 ms int4 decode step)
    kernel_ready: bool = False

    def mask(self, sliding_window: int | None, chunk: int | None = None) -> torch.Tensor:
        """[B, 1, 1, Lmax] bool, cached per (window, chunk) because layers share it."""
        key = (sliding_window, chunk)
        if key not in self._masks:
            kv_pos = torch.arange(self.kv_idx.shape[1], device=self.kv_idx.device)[None, :]
            seq = self.seq_lens[:, None]
            allowed = kv_pos < seq
            if sliding_window is not None:
                allowed &= (seq - 1 - kv_pos) < sliding_window
            if chunk is not None:
                allowed &= kv_pos >= ((seq - 1) // chunk) * chunk
            self._masks[key] = allowed[:, None, None]
        return self._masks[key]


@dataclass
class _ExtendSpan:
    """One prompt span, attended on its own: no padding against other spans of different lengths."""

    start: int  # packed token range [start, end)
    end: int
    prefix: int  # tokens of this sequence already in the pool
    kv_idx: torch.Tensor  # [prefix + len] slots of the sequence, read when the step's own K/V are not enough
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    # Position ranges [a, b) whose tokens also see each other's later tokens (Gemma 3's image blocks, as
    # transformers' token_type_ids mask: causal OR same block, then the window).
    blocks: tuple[tuple[int, int], ...] = ()

    def mask(
        self, sliding_window: int | None, device: torch.device, chunk: int | None = None
    ) -> torch.Tensor:
        """[1, 1, len, prefix + len] bool: causal over the whole history, inside the window and chunk."""
        key = (sliding_window, chunk)
        if key not in self._masks:
            q_pos = self.prefix + torch.arange(self.end - self.start, device=device)
            kv_pos = torch.arange(self.prefix + self.end - self.start, device=device)
            diff = q_pos[:, None] - kv_pos[None, :]
            allowed = diff >= 0
            for a, b in self.blocks:
                allowed |= ((q_pos >= a) & (q_pos < b))[:, None] & ((kv_pos >= a) & (kv_pos < b))[None, :]
            if sliding_window is not None:
                allowed &= diff < sliding_window
            if chunk is not None:
                allowed &= (q_pos[:, None] // chunk) == (kv_pos[None, :] // chunk)
            self._masks[key] = allowed[None, None]
        return self._masks[key]


@dataclass
class TorchAttnMetadata:
    decode: _DecodeGroup | None
    extends: list[_ExtendSpan]
    shared: SharedDecodeGroups | None = None
    bidirectional: BidirectionalPlan | None = None  # encoder layers' groups (bidirectional.py), on first use
    # cpu_kernels' flash kernels (span_attention, shared_decode_attention) are built, switched on and
    # have their ISA for the pool's dtype: asked once a step
    span_kernel: bool = False


class TorchAttnBackend(AttentionBackend):
    def __init__(self, min_shared_prefix: int | None = DEFAULT_MIN_SHARED_PREFIX) -> None:
        """min_shared_prefix: decodes that share at least this many cached tokens read them once (see
        shared_prefix.py); None turns that off."""
        self.min_shared_prefix = min_shared_prefix

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        fb = forward_batch
        ext_list = fb.extend_lens_list
        rows = fb.rows_list
        singles = fb.prompt_singles  # one-token prompt spans: attended as prompts (ForwardBatch says why)
        # one token per span, each a decode: no prompt span to attend alone
        pure_decode = len(ext_list) == fb.num_tokens and not singles
        if pure_decode:
            decode_ids = list(range(len(ext_list)))
        else:
            decode_ids = [i for i, n in enumerate(ext_list) if n == 1 and i not in singles]
        shared = None
        min_shared = self.min_shared_prefix
        # radixlm's in-place decode kernel and flash kernels (prompt spans, shared groups): asked once a step
        on_cpu = fb.input_ids.device.type == "cpu"
        decode_kernel = on_cpu and cpu_kernels.decode_attention_ok()
        span_kernel = on_cpu and cpu_kernels.span_attention_ok(fb.kv_pool.k_buffers[0].dtype)
        if (
            min_shared is not None
            and len(decode_ids) > 1
            and self._groups_pay(fb, decode_kernel, span_kernel)
        ):
            # Two decodes share min_shared cached tokens only if they hold the same slot at position
            # min_shared - 1 (a slot is written once, for one token path). When those slots all differ,
            # find_shared_groups would find nothing: one column of the host copy says so for less
            # (measured ~10 us vs ~100 us for 64 decodes, 2-core CPU).
            seqs = fb.seq_lens_list
            candidates = [rows[i] for i in decode_ids if seqs[i] > min_shared]
            if len(candidates) > 1:
                probed = fb.req_to_token_host.numpy()[candidates, min_shared - 1]
                if len(np.unique(probed)) < len(candidates):
                    decode_ids, shared = self._split_shared(fb, rows, decode_ids)
        decode = None
        if decode_ids:
            decode = self._build_decode_group(fb, decode_ids)
            decode.kernel_ready = decode_kernel
        if pure_decode:
            fb.attn_metadata = TorchAttnMetadata(decode, [], shared, span_kernel=span_kernel)
            return
        extends = []
        start = 0
        prefix_list = fb.prefix_lens_list
        for i, n in enumerate(ext_list):
            if n > 1 or i in singles:
                p = prefix_list[i]
                blocks = fb.image_blocks.get(i, ())
                extends.append(
                    _ExtendSpan(start, start + n, p, fb.req_to_token[rows[i], : p + n], blocks=blocks)
                )
            start += n
        fb.attn_metadata = TorchAttnMetadata(decode, extends, shared, span_kernel=span_kernel)

    @staticmethod
    def _groups_pay(fb: ForwardBatch, decode_kernel: bool, span_kernel: bool) -> bool:
        """Whether decodes that share a prefix are worth grouping. Where cpu_kernels' shared-decode kernel
        takes the pool's dtype (span_kernel: bf16 on AVX512_BF16, float32 on AVX-512), a group reads its
        prefix once. A float32 group without it runs in torch (its keys gathered, a mask, SDPA), which
        measured slower than the in-place decode kernel reading every history where it lies: the 0.5B
        shape's fp32 shared-prefix workload (8 prefixes of 1,024 tokens, 64 decodes), decode steps 268-280
        ms grouped against 236-242 ms, the run 37.1-40.1 s against 36.1-36.3 s. So such a float32 pool is
        not grouped (a layer the kernel does not take, e.g. softcapped, then decodes in torch's padded form
        instead)."""
        return span_kernel or not decode_kernel or fb.kv_pool.k_buffers[0].dtype != torch.float32

    def _split_shared(
        self, fb: ForwardBatch, span_rows: list[int], decode_ids: list[int]
    ) -> tuple[list[int], SharedDecodeGroups | None]:
        """The decode spans left for the padded group, and the shared groups (or None)."""
        assert self.min_shared_prefix is not None
        starts = list(itertools.accumulate(fb.extend_lens_list, initial=0))
        rows = [span_rows[i] for i in decode_ids]
        seqs = [fb.seq_lens_list[i] for i in decode_ids]
        # Grouping reads slots, so it reads the host copy: no device-to-host sync per step.
        groups, singles = find_shared_groups(fb.req_to_token_host, rows, seqs, self.min_shared_prefix)
        if not groups:
            return decode_ids, None
        tokens = [starts[i] for i in decode_ids]
        shared = build_shared_groups(fb.req_to_token, groups, rows, seqs, tokens, fb.input_ids.device)
        return [decode_ids[i] for i in singles], shared

    @staticmethod
    def _build_decode_group(fb: ForwardBatch, span_ids: list[int]) -> _DecodeGroup:
        device = fb.input_ids.device
        seq_list = fb.seq_lens_list
        max_kv = max(seq_list[i] for i in span_ids)
        if len(span_ids) == fb.num_tokens:
            # A pure decode step (the common one): span i is token i, so nothing needs gathering by span
            # and each layer writes its output without a scatter.
            token_idx, seq, rows = None, fb.seq_lens, fb.req_pool_indices
            if min(seq_list) == max_kv:
                # Every history is the longest (batch 1 always): no padding, so nothing to mask or fill.
                # One row is a view of the table (the table changes only between steps); the mask is all
                # True. Four torch ops fewer than below (measured ~60 us per step at batch 1, 2-core CPU).
                b = len(span_ids)
                if b == 1:  # table[r : r + 1, :max_kv], as one view op (half the cost of the slicing)
                    r = fb.rows_list[0]
                    table = fb.req_to_token
                    stride = table.stride()
                    kv_idx = table.as_strided((1, max_kv), stride, table.storage_offset() + r * stride[0])
                else:
                    kv_idx = fb.req_to_token[:, :max_kv].index_select(0, rows)
                group = _DecodeGroup(None, kv_idx, seq)
                group._masks[(None, None)] = torch.ones(b, 1, 1, max_kv, dtype=torch.bool, device=device)
                return group
        else:
            ids = torch.tensor(span_ids, dtype=torch.int64, device=device)
            starts = torch.cumsum(fb.extend_lens, 0) - fb.extend_lens
            token_idx, seq, rows = starts[ids], fb.seq_lens[ids], fb.req_pool_indices[ids]
        valid = torch.arange(max_kv, device=device).unsqueeze(0) < seq.unsqueeze(1)
        # a column slice, then index_select: cheaper than advanced indexing with a slice on a small batch
        history = fb.req_to_token[:, :max_kv].index_select(0, rows)
        kv_idx = history.masked_fill(~valid, 0)
        group = _DecodeGroup(token_idx, kv_idx, seq)
        group._masks[(None, None)] = valid.view(
            valid.shape[0], 1, 1, max_kv
        )  # the window-free mask is this test
        return group

    def forward(
        self,
        q: torch.Tensor,
        forward_batch: ForwardBatch,
        *,
        layer_id: int,
        scaling: float,
        sliding_window: int | None,
        softcap: float | None,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
        chunk: int | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """sinks: one logit per query head that joins every softmax with a zero value (gpt-oss); chunk:
        attention only inside the query's chunk of that many positions (Llama 4's chunked layers);
        causal=False: every query sees its whole prompt (encoders), which must be in this step whole."""
        if not causal:
            return self._bidirectional(q, k, v, forward_batch, scaling, sliding_window, softcap, sinks, chunk)
        pool = forward_batch.kv_pool
        k_buf, v_buf = pool.k_buffers[layer_id], pool.v_buffers[layer_id]
        T, H, _ = q.shape
        meta: TorchAttnMetadata = forward_batch.attn_metadata
        opts = _Scores(scaling, softcap, sinks, pool.k_scales[layer_id], pool.v_scales[layer_id])
        window = _Window(sliding_window, chunk)
        if meta.decode is not None and meta.decode.token_idx is None:
            return _attend_decodes(q, k_buf, v_buf, meta.decode, opts, window)
        out = q.new_empty(T, H, v_buf.shape[-1])
        if meta.decode is not None:
            out[meta.decode.token_idx] = _attend_decodes(q, k_buf, v_buf, meta.decode, opts, window)
        if meta.shared is not None:
            sh = meta.shared
            if meta.span_kernel and _flash_kernel_ok(q, k_buf, v_buf, opts, window):
                # radixlm's CPU kernel: the prefix's rows read in place once per group, no mask, no padding
                o = cpu_kernels.ops().shared_decode_attention(
                    q.contiguous(),
                    k_buf,
                    v_buf,
                    sh.token_idx,
                    sh.kv_idx,
                    sh.prefix_lens,
                    sh.own_lens,
                    opts.scaling,
                )
                out[sh.out_tokens] = o.index_select(0, sh.out_rows)
            else:
                out[sh.out_tokens] = _attend_shared(q, k_buf, v_buf, sh, opts, window)
        # A Python loop over prompt spans (a few per step), never over tokens.
        for sp in meta.extends:
            if meta.span_kernel and _span_kernel_ok(q, k_buf, v_buf, sp, opts, window):
                # radixlm's CPU kernel: flash attention over the pool's rows in place, no gather, no mask
                qs = q[sp.start : sp.end].contiguous()
                ops = cpu_kernels.ops()
                out[sp.start : sp.end] = ops.span_attention(
                    qs, k_buf, v_buf, sp.kv_idx, sp.prefix, opts.scaling
                )
            else:
                out[sp.start : sp.end] = _attend_span(q, k, v, k_buf, v_buf, sp, opts, window)
        return out

    @staticmethod
    def _bidirectional(
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        fb: ForwardBatch,
        scaling: float,
        sliding_window: int | None,
        softcap: float | None,
        sinks: torch.Tensor | None,
        chunk: int | None,
    ) -> torch.Tensor:
        """Encoder layers: each prompt attends over all of itself (bidirectional.py)."""
        if k is None or v is None:
            raise RuntimeError("bidirectional attention needs the step's own keys and values")
        extras = [n for n, x in (("softcap", softcap), ("sinks", sinks), ("chunk", chunk)) if x is not None]
        if extras:
            raise NotImplementedError(
                f"bidirectional attention with {extras[0]} is not implemented in the torch backend"
            )
        meta: TorchAttnMetadata = fb.attn_metadata
        if meta.bidirectional is None:
            meta.bidirectional = BidirectionalPlan.build(fb)
        return attend_bidirectional(q, k, v, meta.bidirectional, scaling, sliding_window)


@dataclass(frozen=True)
class _Window:
    """Which past positions a query sees besides causality: a sliding window, and/or its chunk only."""

    sliding: int | None = None
    chunk: int | None = None

    @property
    def full(self) -> bool:
        return self.sliding is None and self.chunk is None


@dataclass(frozen=True)
class _Scores:
    """How a layer turns q.k into probabilities: the scale, Gemma 2's softcap, gpt-oss's per-head sinks.
    Without softcap and sinks SDPA does it; otherwise the explicit form (_explicit_attention)."""

    scaling: float
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # [H]
    # The pool's dequantization scales for this layer (fp8 KV, kv/kv_cache_dtype.py; 1.0 otherwise).
    k_scale: float = 1.0
    v_scale: float = 1.0

    @property
    def explicit(self) -> bool:
        return self.softcap is not None or self.sinks is not None

    def sinks_as(self, *shape: int) -> torch.Tensor | None:
        """The sinks viewed to broadcast against scores [..., Lq, L] of a query layout (shape ends in Lq)."""
        return None if self.sinks is None else self.sinks.reshape(*shape, 1)


def gather_kv(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """buf[slots] for a pool buffer [N, Hkv, D] and slots of any shape -> [*slots.shape, Hkv, D].

    index_select on the flattened slots, because advanced indexing takes a general scatter/gather path on
    CPU that is 4-8x slower for this shape (measured: 17 ms vs 2.1 ms for 64 x 1100 slots, 2 x 64 bf16).
    """
    return buf.index_select(0, slots.reshape(-1)).view(*slots.shape, *buf.shape[1:])


def _kv_rows(buf: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Gathered pool rows in the query's dtype: an fp8 pool's rows times the layer's scale (the inverse
    of KVPool.write's quantization); other pools' rows only cast."""
    if buf.element_size() == 1 and buf.dtype.is_floating_point:  # fp8: gathered as bytes, like KVPool.write
        rows = gather_kv(buf.view(torch.uint8), slots).view(buf.dtype).to(dtype)
    else:
        rows = gather_kv(buf, slots).to(dtype)
    return rows if scale == 1.0 else rows * scale


def _attend_span(
    q: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    sp: _ExtendSpan,
    opts: _Scores,
    window: _Window,
) -> torch.Tensor:
    """One prompt span -> [len, H, Dv]. Without a prefix, the step's own K/V are the whole history: no gather
    (and with an fp8 pool, the prompt attends to its K/V unrounded, as FlashInfer's ragged prefill does)."""
    H = q.shape[1]
    qh = q[sp.start : sp.end].transpose(0, 1).unsqueeze(0)  # [1, H, e, D]
    if sp.prefix == 0 and k_new is not None and v_new is not None:
        k, v = k_new[sp.start : sp.end].to(q.dtype), v_new[sp.start : sp.end].to(q.dtype)
    else:
        k = _kv_rows(k_buf, sp.kv_idx, q.dtype, opts.k_scale)
        v = _kv_rows(v_buf, sp.kv_idx, q.dtype, opts.v_scale)
    kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
    gqa = kh.shape[1] != H
    scaling = opts.scaling
    if opts.explicit:
        mask = sp.mask(window.sliding, q.device, window.chunk)
        o = _explicit_attention(qh, kh, vh, mask, opts, opts.sinks_as(1, H, 1))
    elif sp.prefix == 0 and window.full and not sp.blocks:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        mask = sp.mask(window.sliding, q.device, window.chunk)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return o[0].transpose(0, 1)


def _span_kernel_ok(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, sp: _ExtendSpan, opts: _Scores, window: _Window
) -> bool:
    """Whether cpu_kernels' span attention takes this prompt span: a layer _flash_kernel_ok takes, and no
    image blocks. Its result for a query depends only on that query's position and history, so a prompt
    split differently by the prefix cache or by chunked prefill gets the same rows."""
    return not sp.blocks and _flash_kernel_ok(q, k_buf, v_buf, opts, window)


def _flash_kernel_ok(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, opts: _Scores, window: _Window
) -> bool:
    """Whether cpu_kernels' flash kernels (span_attention, shared_decode_attention) take this layer: plain
    causal softmax attention (no softcap, sinks, window or chunk), queries and pool of one dtype, bf16 or
    float32 (not fp8), and the head shapes they have registers for. (Whether the CPU has the ISA for that
    dtype: span_kernel, asked once a step.)"""
    H, D = q.shape[1], q.shape[2]
    Hkv, Dv = k_buf.shape[1], v_buf.shape[2]
    return (
        q.dtype == k_buf.dtype == v_buf.dtype
        and q.dtype in (torch.bfloat16, torch.float32)
        and not opts.explicit
        and window.full
        and k_buf.shape[2] == D
        and D % 2 == 0
        and Dv % 16 == 0
        and (Dv <= 128 or Dv == 256)
        and H % Hkv == 0
        and H // Hkv <= 16
    )


def _attend_decodes(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    g: _DecodeGroup,
    opts: _Scores,
    window: _Window,
) -> torch.Tensor:
    """The decode group -> [B, H, Dv], in span order."""
    q1 = q if g.token_idx is None else q.index_select(0, g.token_idx)  # [B, H, D]
    if g.kernel_ready and _in_place_ok(q1, k_buf, v_buf, opts, window):
        # radixlm's CPU kernel reads each history's rows where they lie in the pool: no gathered copy.
        ops = cpu_kernels.ops()
        return ops.decode_attention(q1.contiguous(), k_buf, v_buf, g.kv_idx, g.seq_lens, opts.scaling)
    k = _kv_rows(k_buf, g.kv_idx, q.dtype, opts.k_scale)  # [B, L, Hkv, D]
    v = _kv_rows(v_buf, g.kv_idx, q.dtype, opts.v_scale)
    return _decode_attention(q1, k, v, g.mask(window.sliding, window.chunk), opts)


def _in_place_ok(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, opts: _Scores, window: _Window
) -> bool:
    """Whether cpu_kernels' decode attention takes this layer: plain softmax attention (no softcap, sinks,
    window or chunk), a pool in the query's dtype (not fp8), head dims by 8 (and, asked once a step: on a CPU
    where it built, switched on).

    Only decodes reach it: a one-token span over a prompt token (a cached prompt recomputing its last
    token) is attended as a prompt span (ForwardBatch.prompt_singles), because in bf16 the kernel's
    rounding differs from SDPA's by an ulp now and then, and a seeded bf16 request repeated on a warm
    prefix cache would otherwise draw different tokens (tests/frontend/test_seed_batch_invariance.py)."""
    return (
        q.device.type == "cpu"
        and not opts.explicit
        and window.full
        and k_buf.dtype == q.dtype == v_buf.dtype
        and q.shape[-1] % 8 == 0
        and v_buf.shape[-1] % 8 == 0
    )


def _attend_shared(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    sh: SharedDecodeGroups,
    opts: _Scores,
    window: _Window,
) -> torch.Tensor:
    """Shared decode groups -> [M, H, Dv] for the real members, in `sh.out_tokens` order.

    Queries are laid out [Gn, Hkv, Kmax * G, D], member-major within a KV head, like _decode_attention folds
    the G heads of one KV head into SDPA's query axis; the keys of a whole group are gathered once.
    """
    _, H, D = q.shape
    Gn, Kmax = sh.num_groups, sh.max_members
    Hkv = k_buf.shape[1]
    G = H // Hkv
    qs = q.index_select(0, sh.token_idx.reshape(-1)).view(Gn, Kmax, Hkv, G, D)
    qs = qs.permute(0, 2, 1, 3, 4).reshape(Gn, Hkv, Kmax * G, D)
    kh = _kv_rows(k_buf, sh.kv_idx, q.dtype, opts.k_scale).transpose(1, 2)  # [Gn, Hkv, L, D]
    vh = _kv_rows(v_buf, sh.kv_idx, q.dtype, opts.v_scale).transpose(1, 2)
    mask = sh.mask(window.sliding, G, window.chunk)
    if not opts.explicit:
        o = F.scaled_dot_product_attention(qs, kh, vh, attn_mask=mask, scale=opts.scaling)
    else:  # query axis: member-major, then the G heads of the KV head
        sinks = None if opts.sinks is None else opts.sinks.view(Hkv, 1, G).expand(Hkv, Kmax, G)
        o = _explicit_attention(
            qs, kh, vh, mask, opts, None if sinks is None else sinks.reshape(1, Hkv, -1, 1)
        )
    Dv = o.shape[-1]
    o = o.view(Gn, Hkv, Kmax, G, Dv).permute(0, 2, 1, 3, 4).reshape(Gn * Kmax, H, Dv)
    return o.index_select(0, sh.out_rows)


def _decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    opts: _Scores,
) -> torch.Tensor:
    """One query per span: q [B, H, D], k/v [B, L, Hkv, D], mask [B, 1, 1, L] -> [B, H, Dv].

    The G query heads that share a KV head all sit at the same position, so they are folded into SDPA's
    query-length axis: q [B, Hkv, G, D] against k [B, Hkv, L, D], one mask row broadcast to all of them.
    On CPU this is several times faster than SDPA with enable_gqa on a single query row (measured:
    1.7-2.6 ms vs 15 ms for B=16, H=14, Hkv=2, L=300 in bf16), and nothing is repeated in memory.
    """
    B, H, D = q.shape
    Hkv = k.shape[2]
    qg = q.view(B, Hkv, H // Hkv, D)
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)
    if not opts.explicit:
        out = F.scaled_dot_product_attention(qg, kh, vh, attn_mask=mask, scale=opts.scaling)
    else:
        out = _explicit_attention(qg, kh, vh, mask, opts, opts.sinks_as(1, Hkv, H // Hkv))
    return out.reshape(B, H, -1)


def _explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    opts: _Scores,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """What SDPA cannot do: softcap * tanh(scores / softcap) before the mask, and sink logits that join the
    softmax (their probability goes to no value). q [.., Hq, Lq, D] with Hq a multiple of k's heads;
    sinks broadcast against the scores' [.., Hq, Lq, 1]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * opts.scaling
    if opts.softcap is not None:
        scores = torch.tanh(scores / opts.softcap) * opts.softcap
    scores = scores.masked_fill(~mask, float("-inf")).float()
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        sink = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
