"""ForwardBatch: what one model step computes, as a packed list of spans.

A span is (request, the next k tokens to compute). A decode is a span of 1, a prompt chunk a span of k,
and a prefix hit simply starts the span later (DESIGN.md invariant 1). All spans are packed into one
token axis T:

    input_ids / positions / out_cache_loc:   [ span 0 tokens | span 1 tokens | ... ]   (T)
    req_pool_indices / prefix_lens / extend_lens / seq_lens:  one entry per span      (B)
    sample_indices: the packed positions whose logits are needed (the last token of spans that sample)

Every attention layer reads this object; the attention backend attaches its per-step metadata
(`attn_metadata`) once, before the first layer, so that no layer recomputes it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radixlm.model.mrope import step_rows

if TYPE_CHECKING:
    from radixlm.kv.kv_pool import KVPool
    from radixlm.layers.attention_backends.base import AttentionBackend
    from radixlm.model.step_input import StepInput


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each token in its sequence
    out_cache_loc: torch.Tensor  # [T] int64, the KV slot each new token's K/V is written to
    req_pool_indices: torch.Tensor  # [B] int64, rows of req_to_token
    prefix_lens: torch.Tensor  # [B] int64, tokens already in the KV cache before this step
    extend_lens: torch.Tensor  # [B] int64, tokens computed in this step
    seq_lens: torch.Tensor  # [B] int64, prefix_lens + extend_lens
    # The same per-span values as host lists, so per-step metadata never reads them back from the device.
    extend_lens_list: list[int]
    seq_lens_list: list[int]
    prefix_lens_list: list[int]
    rows_list: list[int]
    sample_indices: torch.Tensor  # [S] int64, indices into T
    # Every span is one token and samples (a pure decode step): the logits rows are the tokens, in order.
    samples_every_token: bool
    kv_pool: KVPool
    req_to_token: torch.Tensor  # [rows, max_context_len] int64
    # The same table on the host (the device table itself on CPU): read by step planning, never synced.
    req_to_token_host: torch.Tensor
    attn_backend: AttentionBackend
    attn_metadata: Any = field(default=None)
    # Vision-language steps: (packed index of the span's first token, its first position, its length, its
    # images) for each span whose positions hold image tokens (the model embeds their features there), and per span
    # index the position ranges [a, b) whose tokens attend to each other both ways (Gemma 3's images).
    span_images: list[tuple[int, int, int, list[dict[str, Any]]]] = field(default_factory=list)
    image_blocks: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    # M-RoPE models (Qwen2-VL): [3, T] rotary positions (model/mrope.py), None when no span has images.
    mrope_positions: torch.Tensor | None = None
    # One-token spans whose token is a prompt token (a cached prompt recomputing its last token, a chunk of
    # one): attention computes them as prompt spans, so such a token attends exactly as it did when its
    # prompt was computed whole. Decodes (one output token each) may take a faster kernel whose rounding
    # differs from the prompt path's by an ulp in bf16 (torch_backend._in_place_ok).
    prompt_singles: frozenset[int] = frozenset()

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens_list)

    @classmethod
    def from_step(
        cls,
        step: StepInput,
        *,
        kv_pool: KVPool,
        req_to_token: torch.Tensor,
        attn_backend: AttentionBackend,
        device: torch.device,
        req_to_token_host: torch.Tensor | None = None,
    ) -> ForwardBatch:
        spans = step.spans
        input_ids: list[int] = []
        slots: list[int] = []
        span_images: list[tuple[int, int, int, list[dict[str, Any]]]] = []
        image_blocks: dict[int, tuple[tuple[int, int], ...]] = {}
        extend_lens = [len(s.token_ids) for s in spans]
        if step.text_only and len(extend_lens) == sum(extend_lens):  # a decode step: one token per span
            input_ids = [s.token_ids[0] for s in spans]
            slots = [s.slots[0] for s in spans]
        elif step.text_only:
            input_ids = list(itertools.chain.from_iterable(s.token_ids for s in spans))
            slots = list(itertools.chain.from_iterable(s.slots for s in spans))
        else:
            for i, s in enumerate(spans):
                if s.images:
                    span_images.append((len(input_ids), s.start, len(s.token_ids), s.images))
                    blocks = tuple(
                        (im["offset"], im["offset"] + im["length"]) for im in s.images if im.get("bidirectional")
                    )
                    if blocks:
                        image_blocks[i] = blocks
                input_ids.extend(s.token_ids)
                slots.extend(s.slots)
        fb = cls.from_spans(
            input_ids=input_ids,
            out_cache_loc=slots,
            req_pool_indices=[s.row for s in spans],
            prefix_lens=[s.start for s in spans],
            extend_lens=extend_lens,
            sample_mask=[s.samples for s in spans],
            kv_pool=kv_pool,
            req_to_token=req_to_token,
            attn_backend=attn_backend,
            device=device,
            req_to_token_host=req_to_token_host,
            span_images=span_images,
            image_blocks=image_blocks,
            prompt_singles=cls.prompt_singles_of(step),
        )
        rows = None if step.text_only else step_rows(spans)
        if rows is not None:
            fb.mrope_positions = rows.to(device)
        return fb

    @staticmethod
    def prompt_singles_of(step: StepInput) -> frozenset[int]:
        """The one-token spans of a step that compute a prompt token, not an output token.

        A sampling span computes an output token's successor unless it samples the request's first output
        (num_output_tokens 0: its token is the prompt's last); a one-token span that does not sample is a
        prompt chunk (or a retracted request's recompute), never a decode."""
        if len(step.sampling) == len(step.spans) and all(x.num_output_tokens for x in step.sampling):
            return frozenset()  # the common step: every span decodes (checked in ~30 ns a span)
        singles = []
        sampling = iter(step.sampling)
        for i, s in enumerate(step.spans):
            first_output = s.samples and next(sampling).num_output_tokens == 0
            if len(s.token_ids) == 1 and (first_output or not s.samples):
                singles.append(i)
        return frozenset(singles)

    @classmethod
    def from_spans(
        cls,
        *,
        input_ids: list[int],
        out_cache_loc: list[int] | torch.Tensor,
        req_pool_indices: list[int],
        prefix_lens: list[int],
        extend_lens: list[int],
        sample_mask: list[bool],
        kv_pool: KVPool,
        req_to_token: torch.Tensor,
        attn_backend: AttentionBackend,
        device: torch.device,
        req_to_token_host: torch.Tensor | None = None,
        span_images: list[tuple[int, int, int, list[dict[str, Any]]]] | None = None,
        image_blocks: dict[int, tuple[tuple[int, int], ...]] | None = None,
        prompt_singles: frozenset[int] = frozenset(),
    ) -> ForwardBatch:
        """Pack spans into tensors with vectorized ops (no Python loop over tokens), built on the host and
        uploaded as one int64 buffer (pinned on CUDA) instead of one small copy per tensor."""
        if req_to_token_host is None:
            if req_to_token.device.type != "cpu":
                raise ValueError("ForwardBatch: a device slot table needs its host copy (req_to_token_host)")
            req_to_token_host = req_to_token
        B = len(extend_lens)
        total = len(input_ids)
        seq_list = [p + e for p, e in zip(prefix_lens, extend_lens)]
        loc = out_cache_loc.tolist() if isinstance(out_cache_loc, torch.Tensor) else out_cache_loc
        if total == B:
            # Decode only (one token per span, at its prefix length): every value is already a list, so
            # the whole step is one tensor built from one list, no arithmetic on the host. Through numpy:
            # torch.tensor(list) costs 3x more (measured: 75 vs 24 us for 512 ints, 8.5 vs 2.8 us for 8).
            last = [i for i, m in enumerate(sample_mask) if m]
            values = [*input_ids, *prefix_lens, *loc, *req_pool_indices, *prefix_lens, *extend_lens, *seq_list]
            host = torch.from_numpy(np.array(values + last, dtype=np.int64))
            num_sample = len(last)
        else:
            ext = torch.tensor(extend_lens, dtype=torch.int64)
            pre = torch.tensor(prefix_lens, dtype=torch.int64)
            starts = torch.cumsum(ext, 0) - ext
            # position of token t = prefix_len(span) + (t - start(span))
            offsets = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(
                starts, ext, output_size=total
            )
            positions = torch.repeat_interleave(pre, ext, output_size=total) + offsets
            last_t = (starts + ext - 1)[torch.tensor(sample_mask, dtype=torch.bool)]
            host = torch.cat(
                [
                    torch.tensor(input_ids, dtype=torch.int64),
                    positions,
                    torch.tensor(
                        [*loc, *req_pool_indices, *prefix_lens, *extend_lens, *seq_list], dtype=torch.int64
                    ),
                    last_t,
                ]
            )
            num_sample = int(last_t.numel())
        if device.type == "cpu":
            dev = host  # already where it runs
        else:
            dev = (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)
        # split_with_sizes: Tensor.split's Python wrapper doubles the cost of this one call at batch 1
        ids_d, pos_d, loc_d, rows_d, pre_d, ext_d, seq_d, last_d = dev.split_with_sizes(
            [total, total, total, B, B, B, B, num_sample]
        )
        batch = cls(
            input_ids=ids_d,
            positions=pos_d,
            out_cache_loc=loc_d,
            req_pool_indices=rows_d,
            prefix_lens=pre_d,
            extend_lens=ext_d,
            seq_lens=seq_d,
            extend_lens_list=list(extend_lens),
            seq_lens_list=seq_list,
            prefix_lens_list=list(prefix_lens),
            rows_list=list(req_pool_indices),
            sample_indices=last_d,
            samples_every_token=num_sample == total == B,
            kv_pool=kv_pool,
            req_to_token=req_to_token,
            req_to_token_host=req_to_token_host,
            attn_backend=attn_backend,
            span_images=span_images or [],
            image_blocks=image_blocks or {},
            prompt_singles=prompt_singles,
        )
        attn_backend.init_forward_metadata(batch)
        return batch
