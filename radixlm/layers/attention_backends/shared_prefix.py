"""Decode attention that reads a shared prefix once for every request that shares it.

When several running requests hold the same cached prefix (a common system prompt, few-shot examples, the
n samples of one prompt), the radix cache gives them the *same* KV slots for it. A decode step that
gathers every request's history separately reads that prefix once per request; on a memory-bound device
(any CPU, and a GPU at small batch) that read is most of the attention cost.

Here the requests that share a prefix form one *shared group*, attended as one sequence:

    keys     [ prefix (P) | suffix of member 0 | suffix of member 1 | ... ]     gathered once
    queries  [ member 0's heads | member 1's heads | ... ]                      one row block each
    mask     member j sees the prefix and its own suffix, nothing of the others

Every member's query is its sequence's last token, so it sees its whole history and there is no causal
structure inside the group, only ownership. The result equals attending each member on its own, since
the masked columns get zero weight.

Groups are found from the slot table alone: a KV slot is written once, for one token at one position of
one token path, so two requests with the same slot at position j share the whole prefix [0, j]. Grouping
on the slot at position `min_prefix - 1` and measuring the common run of slots from there gives groups
that share at least `min_prefix` tokens. A group whose members' own tokens outgrow the prefix is split
(see _split_by_own_tokens), since the mask does not save the arithmetic on other members' tokens.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class SharedDecodeGroups:
    """Every shared group of one step, padded to a common shape.

    Gn groups, Kmax members at most, Lmax keys at most (prefix plus all members' suffixes).
    """

    token_idx: torch.Tensor  # [Gn, Kmax] packed query token of each member (padding: the group's first)
    member_valid: torch.Tensor  # [Gn, Kmax] bool
    kv_idx: torch.Tensor  # [Gn, Lmax] KV slots (padding: slot 0, the null page)
    owner: torch.Tensor  # [Gn, Lmax] -1 the shared prefix, j member j's suffix, -2 padding
    kv_pos: torch.Tensor  # [Gn, Lmax] absolute position of each key in its sequence
    q_pos: torch.Tensor  # [Gn, Kmax] absolute position of each member's query
    out_rows: torch.Tensor  # [M] indices into the flattened [Gn * Kmax] member axis that are real
    out_tokens: torch.Tensor  # [M] the packed token each of those rows answers
    prefix_lens: torch.Tensor  # [Gn] shared prefix of each group
    # [Gn, Kmax] each member's own keys (after the prefix, members in order); 0: padding
    own_lens: torch.Tensor
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return int(self.token_idx.shape[0])

    @property
    def max_members(self) -> int:
        return int(self.token_idx.shape[1])

    def mask(self, sliding_window: int | None, heads_per_kv: int, chunk: int | None = None) -> torch.Tensor:
        """[Gn, 1, Kmax * heads_per_kv, Lmax] bool, rows in (member, head) order. chunk: attention only
        inside the query's chunk of that many positions (Llama 4's chunked layers)."""
        key = (sliding_window, chunk)
        if key not in self._masks:
            members = torch.arange(self.max_members, device=self.owner.device)
            own = self.owner[:, None, :]
            allowed = (own == -1) | (own == members[None, :, None])  # [Gn, Kmax, Lmax]
            if sliding_window is not None:
                allowed &= (self.q_pos[:, :, None] - self.kv_pos[:, None, :]) < sliding_window
            if chunk is not None:
                allowed &= self.kv_pos[:, None, :] >= (self.q_pos[:, :, None] // chunk) * chunk
            # A padding member attends to column 0 only, so that its softmax row is never all-masked (NaN).
            col0 = torch.zeros_like(allowed)
            col0[:, :, 0] = True
            allowed = torch.where(self.member_valid[:, :, None], allowed, col0)
            self._masks[key] = allowed.repeat_interleave(heads_per_kv, dim=1)[:, None]
        return self._masks[key]


def find_shared_groups(
    req_to_token: torch.Tensor, rows: list[int], seq_lens: list[int], min_prefix: int
) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Split decode spans into shared groups and singles.

    rows / seq_lens: each decode span's req_to_token row and sequence length (its query is the last token).
    Returns ([(member span indices, shared prefix length)], single span indices). A group has two or more
    members and a prefix of at least `min_prefix` tokens; every member keeps at least its own last token
    outside the prefix.
    """
    probe = min_prefix - 1
    candidates = [i for i, n in enumerate(seq_lens) if n > min_prefix]
    by_slot: dict[int, list[int]] = defaultdict(list)
    if candidates:
        slots = req_to_token[[rows[i] for i in candidates], probe].tolist()
        for i, slot in zip(candidates, slots, strict=True):
            by_slot[slot].append(i)
    groups: list[tuple[list[int], int]] = []
    grouped: set[int] = set()
    for members in by_slot.values():
        if len(members) < 2:
            continue
        shortest = min(seq_lens[i] for i in members) - 1
        table = req_to_token[[rows[i] for i in members], :shortest]
        same = (table == table[:1]).all(0)
        prefix = int(same.to(torch.int32).cumprod(0).sum())
        if prefix < min_prefix:
            continue
        for part in _split_by_own_tokens(members, [seq_lens[i] - prefix for i in members], prefix):
            groups.append((part, prefix))
            grouped.update(part)
    singles = [i for i in range(len(rows)) if i not in grouped]
    return groups, singles


def _split_by_own_tokens(members: list[int], own: list[int], prefix: int) -> list[list[int]]:
    """Parts of two or more members whose own tokens add up to at most `prefix`.

    Every query row of a group is scored against every key of the group, masked or not, so a group's
    arithmetic grows with (members x all their own tokens). Capping the own tokens at the prefix keeps it
    within twice what attending the members one by one costs, while the prefix is still read once per part.
    Without the cap, 16 members of 512 own tokens behind a 128-token prefix attended 8x slower than one by
    one (measured, CPU SDPA, bf16). A member left alone in its part is not grouped.
    """
    parts: list[list[int]] = []
    part: list[int] = []
    total = 0
    for n, i in sorted(zip(own, members, strict=True)):  # short first: more members fit in a part
        if part and total + n > prefix:
            parts.append(part)
            part, total = [], 0
        part.append(i)
        total += n
    parts.append(part)
    # A part of two or more never exceeds the cap: a member that would overflow a non-empty part starts a
    # new one; only a member already over the cap alone makes a part that does, and it has no company.
    return [p for p in parts if len(p) > 1]


def build_shared_groups(
    req_to_token: torch.Tensor,
    groups: list[tuple[list[int], int]],
    rows: list[int],
    seq_lens: list[int],
    token_idx: list[int],
    device: torch.device,
) -> SharedDecodeGroups:
    """Lay the groups out as padded tensors (see SharedDecodeGroups)."""
    kmax = max(len(m) for m, _ in groups)
    lmax = max(p + sum(seq_lens[i] - p for i in m) for m, p in groups)
    n = len(groups)
    kv_idx = torch.zeros(n, lmax, dtype=torch.int64, device=device)
    owner = torch.full((n, lmax), -2, dtype=torch.int64, device=device)
    kv_pos = torch.zeros(n, lmax, dtype=torch.int64, device=device)
    q_tok = torch.zeros(n, kmax, dtype=torch.int64)
    q_pos = torch.zeros(n, kmax, dtype=torch.int64)
    valid = torch.zeros(n, kmax, dtype=torch.bool)
    own_lens = torch.zeros(n, kmax, dtype=torch.int64)
    out_rows, out_tokens = [], []
    for g, (members, prefix) in enumerate(groups):
        table = req_to_token[rows[members[0]], :prefix]
        kv_idx[g, :prefix] = table
        owner[g, :prefix] = -1
        kv_pos[g, :prefix] = torch.arange(prefix, device=device)
        col = prefix
        for j, i in enumerate(members):
            n_own = seq_lens[i] - prefix
            kv_idx[g, col : col + n_own] = req_to_token[rows[i], prefix : seq_lens[i]]
            owner[g, col : col + n_own] = j
            kv_pos[g, col : col + n_own] = torch.arange(prefix, seq_lens[i], device=device)
            col += n_own
            q_tok[g, j] = token_idx[i]
            q_pos[g, j] = seq_lens[i] - 1
            valid[g, j] = True
            own_lens[g, j] = n_own
            out_rows.append(g * kmax + j)
            out_tokens.append(token_idx[i])
        q_tok[g, len(members) :] = token_idx[members[0]]
    return SharedDecodeGroups(
        token_idx=q_tok.to(device),
        member_valid=valid.to(device),
        kv_idx=kv_idx,
        owner=owner,
        kv_pos=kv_pos,
        q_pos=q_pos.to(device),
        out_rows=torch.tensor(out_rows, dtype=torch.int64, device=device),
        out_tokens=torch.tensor(out_tokens, dtype=torch.int64, device=device),
        prefix_lens=torch.tensor([p for _, p in groups], dtype=torch.int64, device=device),
        own_lens=own_lens.to(device),
    )
