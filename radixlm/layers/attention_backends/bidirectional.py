"""Bidirectional (encoder) attention for the torch backend: every query of a prompt sees the whole prompt.

A step's prompts are whole (the scheduler never chunks a pooling request and pooling models have no
prefix cache), so the step's own K/V are each prompt's entire history: nothing is read back from the pool.

Prompts are padded into groups and each group is one SDPA call:

    q, k, v   [B, H, Lmax, D]   gathered from the packed tokens (padding rows repeat a real token)
    mask      [B, 1, Lmax, Lmax] key inside its prompt (and, with a sliding window, |q - k| < window)

One call per group rather than per prompt, because a batch of embeddings is hundreds of short prompts and
a tiny SDPA call costs about the same as a large one on CPU (measured on this 2-core machine under load:
512 per-prompt calls for 256 prompts of 1-9 tokens took 4.2 s of a 5.1 s step). Prompts are grouped in
length order so that padding stays at most twice the real tokens, and a group's mask stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from radixlm.model.forward_batch import ForwardBatch

MAX_MASK_ELEMENTS = 1 << 25  # a group's [B, Lmax, Lmax] mask stays under 32 MiB of bools


@dataclass
class _Group:
    token_idx: torch.Tensor  # [B, Lmax] packed token index per (prompt, position); padding repeats a real one
    valid: torch.Tensor  # [B, Lmax] the position is inside its prompt
    out_idx: torch.Tensor  # [n] packed token index of each valid (prompt, position), row-major
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            m = self.valid[:, None, None, :]  # [B, 1, 1, L]: keys inside the prompt
            if window is not None:
                pos = torch.arange(self.valid.shape[1], device=self.valid.device)
                m = m & ((pos[:, None] - pos[None, :]).abs() < window)[None, None]
            self._masks[window] = m
        return self._masks[window]


@dataclass
class BidirectionalPlan:
    """The step's groups, built once on first use and shared by every layer."""

    groups: list[_Group]

    @classmethod
    def build(cls, fb: ForwardBatch) -> BidirectionalPlan:
        if any(fb.prefix_lens_list):
            raise RuntimeError(
                "bidirectional attention needs each prompt whole in one step (a span had a cached prefix)"
            )
        lens = fb.extend_lens_list
        starts = [0] * len(lens)
        for i in range(1, len(lens)):
            starts[i] = starts[i - 1] + lens[i - 1]
        order = sorted(range(len(lens)), key=lens.__getitem__)
        device = fb.input_ids.device
        groups, members, total = [], [], 0
        for i in order:
            n = len(members) + 1
            if members and (n * lens[i] > 2 * (total + lens[i]) or n * lens[i] ** 2 > MAX_MASK_ELEMENTS):
                groups.append(_group([starts[j] for j in members], [lens[j] for j in members], device))
                members, total = [], 0
            members.append(i)
            total += lens[i]
        if members:
            groups.append(_group([starts[j] for j in members], [lens[j] for j in members], device))
        return cls(groups)


def _group(starts: list[int], lens: list[int], device: torch.device) -> _Group:
    width = max(lens)
    pos = torch.arange(width, device=device)[None, :]
    start = torch.tensor(starts, device=device)[:, None]
    length = torch.tensor(lens, device=device)[:, None]
    valid = pos < length
    token_idx = start + torch.minimum(pos, length - 1)  # padding repeats the prompt's last token
    return _Group(token_idx, valid, token_idx[valid])


def attend_bidirectional(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BidirectionalPlan,
    scaling: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] (the step's own) -> [T, H, Dv]."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    gqa = k.shape[1] != q.shape[1]
    for g in plan.groups:
        qg = q[g.token_idx].transpose(1, 2)  # [B, H, L, D]
        kg = k[g.token_idx].to(q.dtype).transpose(1, 2)
        vg = v[g.token_idx].to(q.dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=g.mask(sliding_window), scale=scaling, enable_gqa=gqa
        )
        out[g.out_idx] = o.transpose(1, 2)[g.valid]
    return out
