"""Sampler: logits [B, V] -> next token ids, with penalties, temperature, top-k/p, min-p, seeds, logprobs.

Everything is batched tensor work; the only Python loops are over rows (in ``SamplingBatch.build``).

Pipeline, in the order of transformers' logits processors:

    raw logits ──> log-softmax (only if logprobs are asked for; "raw" like vLLM's default)
        │
        ├─ logit_bias           (OpenAI's: + bias at the listed tokens)
        ├─ repetition penalty   (prompt + output tokens, transformers semantics)
        ├─ frequency / presence (output tokens, OpenAI semantics)
        ├─ min_new_tokens ban   (-inf on eos + stop_token_ids; not on grammar rows, whose grammar ends them)
        ├─ grammar mask         (-inf on every token a row's grammar does not allow: one masked_fill)
        │
        ├─ greedy rows:  argmax
        └─ other rows:   / temperature -> softmax -> top-k -> top-p -> min-p -> seeded exponential race

Randomness is counter-based: the noise for (seed, step, token) is an integer hash of those three
numbers (splitmix64), turned into Exp(1) noise E, and the token is the winner of the exponential
race argmax(p / E) (equivalent to Gumbel-max). So a row's token depends only on its own logits,
params, seed and step, never on the other rows, the batch size or the order of rows, and no torch
RNG state is read or advanced. Every stage computes a row's values with row-local arithmetic, and
the shortcuts that depend on the rest of the batch (partial topk instead of a sort, gathering the
sampling rows) give bit-identical results for the row.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from radixlm.sampling_params import SamplingParams

# --------------------------------------------------------------------------------------------------
# Counter-based random numbers
# --------------------------------------------------------------------------------------------------


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed value torch int64 ops need."""
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)  # splitmix64's increment (odd, so idx * _GOLDEN is a bijection)
_MIX_1 = _i64(0xBF58476D1CE4E5B9)
_MIX_2 = _i64(0x94D049BB133111EB)
_STEP_SALT = _i64(0xD1B54A32D192ED03)
# Domain separation: the block-level and token-level noises of the race must be independent.
_BLOCK_DOMAIN = _i64(0x8CB92BA72F3D8DD7)
_TOKEN_DOMAIN = _i64(0x2545F4914F6CDD1D)
_UNIFORM_BITS = 23  # float32 holds (m + 0.5) * 2**-23 exactly for every 23-bit m, so u never rounds to 1


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64: torch's >> is arithmetic, so mask off the copied sign bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer (Stafford's Mix13): a bijection on 64 bits with full avalanche.

    int64 multiplication in torch wraps modulo 2**64, which is the unsigned arithmetic we want.
    """
    x = x ^ _shr(x, 30)
    x = x * _MIX_1
    x = x ^ _shr(x, 27)
    x = x * _MIX_2
    return x ^ _shr(x, 31)


def _row_keys(seeds: torch.Tensor, steps: torch.Tensor, domain: int) -> torch.Tensor:
    """One 64-bit key per row from (seed, step, domain); [R] int64."""
    return _mix64(_mix64(seeds ^ domain) + steps * _STEP_SALT)


def uniform_noise(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Uniforms strictly inside (0, 1) from hash(key, index): keys [R], index [N] or [R, N] -> [R, N] float32."""
    x = _mix64(keys[:, None] + (index + 1) * _GOLDEN)
    m = _shr(x, 64 - _UNIFORM_BITS)  # the top bits are the best mixed
    return (m.to(torch.float32) + 0.5) * (2.0**-_UNIFORM_BITS)


def exponential_noise(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise, strictly positive and finite; same shapes as ``uniform_noise``."""
    return -torch.log(uniform_noise(keys, index))


# --------------------------------------------------------------------------------------------------
# Per-step inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class PenaltyInputs:
    """The (row, token) entries that penalties touch, as flat indices ``row * V + token`` into the
    [B, V] logits. Sparse, because a sequence holds thousands of distinct tokens, not 152k."""

    repetition_index: torch.Tensor | None  # [N] int64, unique: tokens in the row's prompt or output
    repetition_factor: torch.Tensor | None  # [N] float32: that row's repetition_penalty
    count_index: torch.Tensor | None  # [M] int64, unique: tokens in the row's output
    counts: torch.Tensor | None  # [M] float32: how often
    frequency: torch.Tensor | None  # [M] float32: that row's frequency_penalty
    presence: torch.Tensor | None  # [M] float32: that row's presence_penalty


@dataclass
class SamplingBatch:
    """Per-step sampling inputs for B rows (one row per sequence being sampled this step)."""

    # The per-row values are None when every row is greedy: nothing reads them then, and not building
    # them is most of a greedy step's sampling cost on a small batch.
    temperatures: torch.Tensor | None  # [B] float32 (greedy rows hold their own value; it is never read)
    top_ps: torch.Tensor | None  # [B] float32
    top_ks: torch.Tensor | None  # [B] int64 (vocab_size when disabled)
    min_ps: torch.Tensor | None  # [B] float32
    seeds: torch.Tensor | None  # [B] int64
    steps: torch.Tensor | None  # [B] int64: index of the token being sampled in that sequence's output
    vocab_size: int
    batch_size: int
    # Rows that sample rather than take the argmax; None when every row samples (no gather needed).
    sample_rows: torch.Tensor | None
    penalties: PenaltyInputs | None
    # (row, token) pairs set to -inf while the row has fewer than min_new_tokens output tokens.
    ban_rows: torch.Tensor | None  # [N] int64
    ban_token_ids: torch.Tensor | None  # [N] int64
    # Python flags computed once at build, so the common cases skip whole stages.
    all_greedy: bool
    need_temperature: bool  # some sampling row has temperature != 1
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    # logit_bias: flat indices row * V + token and the value added there; None when no row has one.
    bias_index: torch.Tensor | None = None  # [N] int64, unique
    bias_values: torch.Tensor | None = None  # [N] float32
    # Constrained decoding: the rows a grammar constrains, as host ints (None: every row), and the bitmask,
    # int32 [B, ceil(V / 32)] on the device, bit t of a constrained row set when token t is allowed (other
    # rows unread). grammar_bitmask None: no grammar row.
    grammar_rows: list[int] | None = None
    grammar_bitmask: torch.Tensor | None = None

    @property
    def need_penalties(self) -> bool:
        return self.penalties is not None

    @property
    def need_min_tokens_ban(self) -> bool:
        return self.ban_rows is not None

    @property
    def need_logit_processing(self) -> bool:
        """Whether ``apply_penalties`` changes anything."""
        return (
            self.penalties is not None
            or self.ban_rows is not None
            or self.bias_index is not None
            or self.grammar_bitmask is not None
        )

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        eos_token_ids: Sequence[int],
        vocab_size: int,
        device: torch.device | str,
        steps: Sequence[int] | None = None,
        grammar_rows: Sequence[int] = (),
        grammar_bitmask: torch.Tensor | None = None,
    ) -> SamplingBatch:
        """Build the tensors for one step.

        ``seeds`` are the effective seeds (the engine draws one when ``params.seed`` is None).
        Only the lengths of ``output_ids`` are read, except for rows with a penalty (which read their
        tokens, and their prompt's for a repetition penalty), so the common case costs O(B) Python work.
        ``steps`` (each row's output length) stands in for those lengths when the caller passes no
        output lists for rows without penalties. ``grammar_rows`` / ``grammar_bitmask``: the rows a grammar
        constrains and the host int32 bitmask, one row per batch row (only the constrained rows are read).
        """
        b = len(params)
        if not (len(seeds) == len(prompt_ids) == len(output_ids) == b):
            raise ValueError(
                f"SamplingBatch.build: params, seeds, prompt_ids and output_ids must have the same length, "
                f"got {b}, {len(seeds)}, {len(prompt_ids)}, {len(output_ids)}"
            )
        if vocab_size < 1:
            raise ValueError(f"SamplingBatch.build: vocab_size must be >= 1, got {vocab_size}")
        device = torch.device(device)

        temperatures, top_ps, top_ks, min_ps = [], [], [], []
        step_of = [len(o) for o in output_ids] if steps is None else list(steps)
        sample_rows: list[int] = []
        penalty_rows: list[int] = []
        ban_rows: list[int] = []
        for i, p in enumerate(params):
            temperatures.append(p.temperature)
            top_ps.append(p.top_p)
            top_ks.append(vocab_size if p.top_k < 0 else min(p.top_k, vocab_size))
            min_ps.append(p.min_p)
            step = step_of[i]
            if not p.is_greedy:
                sample_rows.append(i)
            if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                penalty_rows.append(i)
            if step < p.min_new_tokens:
                ban_rows.append(i)
        if grammar_rows:
            # A grammar that allows only its end token would be left with no token at all under the ban.
            constrained = set(grammar_rows)
            ban_rows = [i for i in ban_rows if i not in constrained]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device)

        # Fold arbitrary Python ints into int64 (two's complement): the hash only sees 64 bits anyway.
        seeds64 = [((int(s) + (1 << 63)) % (1 << 64)) - (1 << 63) for s in seeds]
        if sample_rows:
            # Two uploads (floats, ints) instead of six: on a small batch each tensor built from a list
            # costs more than the values in it.
            temps_d, top_ps_d, min_ps_d = tensor([temperatures, top_ps, min_ps], torch.float32)
            top_ks_d, seeds_d, steps_d = tensor([top_ks, seeds64, step_of], torch.int64)
        else:
            temps_d = top_ps_d = min_ps_d = top_ks_d = seeds_d = steps_d = None

        need_temperature = any(temperatures[i] != 1.0 for i in sample_rows)
        need_top_k = any(top_ks[i] < vocab_size for i in sample_rows)
        need_top_p = any(top_ps[i] < 1.0 for i in sample_rows)
        need_min_p = any(min_ps[i] > 0.0 for i in sample_rows)

        return cls(
            temperatures=temps_d,
            top_ps=top_ps_d,
            top_ks=top_ks_d,
            min_ps=min_ps_d,
            seeds=seeds_d,
            steps=steps_d,
            vocab_size=vocab_size,
            batch_size=b,
            sample_rows=None if len(sample_rows) == b else tensor(sample_rows, torch.int64),
            penalties=_build_penalties(params, penalty_rows, prompt_ids, output_ids, vocab_size, device),
            **_build_ban(params, ban_rows, eos_token_ids, vocab_size, device),
            all_greedy=not sample_rows,
            need_temperature=need_temperature,
            need_top_k=need_top_k,
            need_top_p=need_top_p,
            need_min_p=need_min_p,
            **_build_bias(params, vocab_size, device),
            **_build_grammar(grammar_rows, grammar_bitmask, b, device),
        )


def _build_grammar(
    rows: Sequence[int], bitmask: torch.Tensor | None, batch_size: int, device: torch.device
) -> dict[str, Any]:
    if bitmask is None or not rows:
        return {"grammar_rows": None, "grammar_bitmask": None}
    if bitmask.shape[0] != batch_size:
        raise ValueError(f"SamplingBatch.build: {batch_size} rows but {bitmask.shape[0]} bitmask rows")
    every = list(rows) == list(range(batch_size))
    return {
        "grammar_rows": None if every else [int(r) for r in rows],
        "grammar_bitmask": bitmask.to(device, non_blocking=True),
    }


def _build_bias(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device
) -> dict[str, torch.Tensor | None]:
    index: list[int] = []
    values: list[float] = []
    for i, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            if 0 <= token < vocab_size:  # the front refuses others; an id past the LM head cannot be sampled
                index.append(i * vocab_size + token)
                values.append(bias)
    if not index:
        return {"bias_index": None, "bias_values": None}
    return {
        "bias_index": torch.tensor(index, dtype=torch.int64).to(device),
        "bias_values": torch.tensor(values, dtype=torch.float32).to(device),
    }


def _flat_token_index(
    rows: Sequence[int], token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Flat indices ``row * V + token`` of every token in the lists (with repeats), [N] int64."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.int64)
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.int64)
    row_of = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.int64), lengths)
    # A prompt id outside the model's vocabulary (a tokenizer larger than the LM head) can never be
    # sampled, so penalizing it is a no-op (transformers drops it too); dropping it also avoids an
    # out-of-bounds index.
    ok = (tokens >= 0) & (tokens < vocab_size)
    return (row_of[ok] * vocab_size + tokens[ok]).to(device)


def _build_penalties(
    params: Sequence[SamplingParams],
    rows: list[int],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device,
) -> PenaltyInputs | None:
    if not rows:
        return None
    pen = PenaltyInputs(None, None, None, None, None, None)

    rep_rows = [i for i in rows if params[i].repetition_penalty != 1.0]
    if rep_rows:
        # transformers' processor gathers over the whole sequence: prompt and output alike.
        seqs = [list(itertools.chain(prompt_ids[i], output_ids[i])) for i in rep_rows]
        index = torch.unique(_flat_token_index(rep_rows, seqs, vocab_size, device))
        factor = torch.ones(len(params), dtype=torch.float32)
        factor[rep_rows] = torch.tensor([params[i].repetition_penalty for i in rep_rows], dtype=torch.float32)
        pen.repetition_index = index
        pen.repetition_factor = factor.to(device)[index // vocab_size]

    count_rows = [i for i in rows if params[i].frequency_penalty != 0.0 or params[i].presence_penalty != 0.0]
    if count_rows:
        flat = _flat_token_index(count_rows, [output_ids[i] for i in count_rows], vocab_size, device)
        index, counts = torch.unique(flat, return_counts=True)
        freq = torch.zeros(len(params), dtype=torch.float32)
        pres = torch.zeros(len(params), dtype=torch.float32)
        freq[count_rows] = torch.tensor(
            [params[i].frequency_penalty for i in count_rows], dtype=torch.float32
        )
        pres[count_rows] = torch.tensor([params[i].presence_penalty for i in count_rows], dtype=torch.float32)
        row_of = index // vocab_size
        pen.count_index = index
        pen.counts = counts.to(torch.float32)
        pen.frequency = freq.to(device)[row_of]
        pen.presence = pres.to(device)[row_of]
    return pen


def _build_ban(
    params: Sequence[SamplingParams],
    rows: list[int],
    eos_token_ids: Sequence[int],
    vocab_size: int,
    device: torch.device,
) -> dict[str, torch.Tensor | None]:
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    for i in rows:
        p = params[i]
        # Like vLLM: with ignore_eos, eos is not a stop token, so there is nothing to hold back.
        stop_ids = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids).union(eos_token_ids)
        ids = sorted(t for t in stop_ids if 0 <= t < vocab_size)
        ban_rows.extend([i] * len(ids))
        ban_ids.extend(ids)
    if not ban_ids:
        return {"ban_rows": None, "ban_token_ids": None}
    return {
        "ban_rows": torch.tensor(ban_rows, dtype=torch.int64).to(device),
        "ban_token_ids": torch.tensor(ban_ids, dtype=torch.int64).to(device),
    }


# --------------------------------------------------------------------------------------------------
# Logit processing
# --------------------------------------------------------------------------------------------------


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logit_bias, then repetition, frequency and presence penalties, then the min_new_tokens ban, IN PLACE
    (the bias first, as vLLM orders its processors: penalties then see the biased logits).

    ``logits`` is a contiguous [B, V] float32 tensor owned by the caller (it is modified). Returns it.
    """
    pen = batch.penalties
    flat = logits.view(-1)
    if batch.bias_index is not None:
        flat[batch.bias_index] += batch.bias_values
    if pen is not None:
        if pen.repetition_index is not None:
            # transformers: score < 0 ? score * penalty : score / penalty, once per distinct seen token.
            x = flat[pen.repetition_index]
            p = pen.repetition_factor
            flat[pen.repetition_index] = torch.where(x < 0, x * p, x / p)
        if pen.count_index is not None:
            # OpenAI: logit - count * frequency_penalty - (count > 0) * presence_penalty; only tokens
            # with count > 0 are listed.
            x = flat[pen.count_index]
            flat[pen.count_index] = x - pen.frequency * pen.counts - pen.presence
    if batch.ban_rows is not None:
        logits[batch.ban_rows, batch.ban_token_ids] = float("-inf")
    if batch.grammar_bitmask is not None:
        apply_token_bitmask(logits, batch.grammar_bitmask, batch.grammar_rows)
    return logits


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask [G, W] -> bool [G, vocab_size]: token t of a row is allowed when bit t % 32 of word
    t // 32 is set (xgrammar's layout). Read as bytes through a 256-entry table: one gather, where
    shifting each word 32 ways measured 1.6x slower (64 x 152k on CPU)."""
    table = ((torch.arange(256, device=bitmask.device)[:, None] >> torch.arange(8, device=bitmask.device)) & 1).bool()
    as_bytes = bitmask.contiguous().view(torch.uint8).long()  # little-endian: byte k of a word = bits 8k..8k+7
    return table[as_bytes].view(bitmask.shape[0], -1)[:, :vocab_size]


@functools.lru_cache(maxsize=1)
def _xgrammar_kernel() -> Any:
    """xgrammar's fused masking kernel (C++ on CPU, CUDA/Triton on GPU), or None without xgrammar."""
    try:
        from xgrammar import apply_token_bitmask_inplace
    except ImportError:
        return None
    return apply_token_bitmask_inplace


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None, *, use_kernel: bool = True
) -> None:
    """-inf at every token the rows' grammars forbid, IN PLACE. bitmask [B, W] has one row per logits row;
    only `rows` are masked (None: all).

    One batched op over all constrained rows: xgrammar's kernel when it is installed (3x faster than the
    torch path on CPU: 53 vs 151 ms for 64 x 152k on a loaded 2-core machine), else the torch path."""
    kernel = _xgrammar_kernel() if use_kernel and logits.dtype == torch.float32 else None
    if kernel is not None:
        kernel(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
        return
    if rows is None:
        logits.masked_fill_(~allowed_tokens(bitmask, logits.shape[1]), float("-inf"))
    else:
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        forbidden = ~allowed_tokens(bitmask[index], logits.shape[1])
        logits[index] = logits[index].masked_fill(forbidden, float("-inf"))


# Top-p looks for each row's nucleus among its 64, then 1024 most likely tokens, and sorts the row
# in full only when the nucleus is larger still. Real LM nuclei are mostly tens of tokens.
_TOP_P_STAGES = (64, 1024)


def _top_k_top_p_threshold(
    probs: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, need_top_k: bool, need_top_p: bool
) -> torch.Tensor:
    """[R, 1]: each row keeps exactly the tokens with ``probs >= threshold`` under top-k, then top-p.

    The threshold is the probability at the last kept sorted position, so ties at the boundary are
    all kept (as transformers' TopKLogitsWarper does) and the kept set is a function of the row
    alone. Only sorted *values* are needed, so partial ``topk``s replace the full sort whenever the
    kept set fits in them: a full sort of 64 x 152k costs ~0.4 s on CPU, a topk(64) ~15 ms.
    """
    r, v = probs.shape
    k = int(torch.where(top_ks < v, top_ks, 0).max()) if need_top_k else 0
    first = max(k, _TOP_P_STAGES[0]) if need_top_p else k
    stages = [first] + ([s for s in _TOP_P_STAGES if s > first] if need_top_p else [])
    stages = [s for s in stages if s < v // 4]  # past that, sorting beats a partial topk

    threshold = torch.empty(r, 1, dtype=probs.dtype, device=probs.device)
    rows = torch.arange(r, device=probs.device)  # the rows still unresolved
    sub_probs, sub_ks, sub_ps = probs, top_ks, top_ps
    to_sort = []
    for i, kk in enumerate(stages):
        vals = sub_probs.topk(kk, dim=-1, sorted=True).values
        n_keep = _n_keep(vals, v, sub_ks, sub_ps, need_top_k, need_top_p)
        _store(threshold, None if i == 0 else rows, _threshold_at(vals, n_keep, v))
        if not need_top_p:
            return threshold  # top-k alone always fits in its first stage
        # A top-p row that kept all kk positions and allows more (top_k > kk) may extend past them.
        short = (n_keep >= kk) & (sub_ps < 1.0) & (sub_ks > kk)
        if i + 1 < len(stages):
            # Skip the next stage for rows that cannot fit in it: its tokens are no likelier than the
            # last one here, so its mass is at most mass + (next - kk) * last. (This only picks the
            # path; every path gives the same threshold.)
            bound = vals.sum(-1) + (stages[i + 1] - kk) * vals[:, -1]
            hopeless = short & (sub_ks >= v) & (bound < sub_ps)
            to_sort.append(rows[hopeless])
            short &= ~hopeless
        rows = rows[short]
        if rows.numel() == 0:
            break
        sub_probs, sub_ks, sub_ps = probs[rows], top_ks[rows], top_ps[rows]
    rows = torch.cat([*to_sort, rows])  # the rows that need a full sort
    if rows.numel():
        every = rows.numel() == r  # then sort `probs` itself rather than a gathered copy
        sub_probs, sub_ks, sub_ps = (
            (probs, top_ks, top_ps) if every else (probs[rows], top_ks[rows], top_ps[rows])
        )
        vals = sub_probs.sort(dim=-1, descending=True).values
        n_keep = _n_keep(vals, v, sub_ks, sub_ps, need_top_k, need_top_p)
        _store(threshold, None if every else rows, _threshold_at(vals, n_keep, v))
    return threshold


def _store(dst: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor) -> None:
    if rows is None:
        dst.copy_(values)
    else:
        dst[rows] = values


def _threshold_at(vals: torch.Tensor, n_keep: torch.Tensor, v: int) -> torch.Tensor:
    """The value at sorted position n_keep - 1; -1 (everything passes) for untruncated rows, whose
    n_keep == V may lie beyond a partial topk."""
    last = vals.gather(1, (n_keep - 1).clamp(max=vals.shape[1] - 1)[:, None])
    return torch.where((n_keep >= v)[:, None], -1.0, last)


def _n_keep(
    vals: torch.Tensor, v: int, top_ks: torch.Tensor, top_ps: torch.Tensor, need_top_k: bool, need_top_p: bool
) -> torch.Tensor:
    """How many positions of the sorted values [R, K] each row keeps; [R] int64 (V when untruncated)."""
    r, k = vals.shape
    n_keep = top_ks.clamp(max=v) if need_top_k else torch.full((r,), v, dtype=torch.int64, device=vals.device)
    if need_top_p:
        in_k = torch.arange(k, device=vals.device)[None, :] < top_ks[:, None]
        vals_k = vals * in_k
        cum = vals_k.cumsum(-1)
        has_k = top_ks < v
        # Top-p renormalizes over the top-k set (transformers applies TopK before TopP). An
        # untruncated row's softmax sums to 1; a constant (rather than probs.sum(), whose rounding
        # on CPU depends on how many rows share the reduction) keeps the row batch-invariant.
        total_k = cum.gather(1, (top_ks.clamp(max=k) - 1)[:, None]).squeeze(1)
        total = torch.where(has_k, total_k, 1.0)
        # Keep the smallest prefix whose mass reaches top_p: position i stays while the mass before it
        # is still below top_p.
        n_p = ((cum - vals_k) < (top_ps * total)[:, None]).sum(-1)
        n_p = torch.where(top_ps < 1.0, n_p, v)
        n_keep = torch.minimum(n_keep, n_p).clamp(min=1)
    return n_keep


# The race is run in two levels: pick a block of _BLOCK tokens by racing the blocks' total
# probabilities, then a token inside it. For independent exponentials this is exactly the flat race
# argmax(p / E) (min of Exp(p_i) over a block is Exp(sum p_i)), but it hashes V/_BLOCK + _BLOCK
# numbers per row instead of V: a full-vocab hash is ~0.5 s for 64 x 152k on CPU.
_BLOCK = 256


def _race(weights: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Sample one token per row with probability proportional to ``weights`` [R, V] (>= 0, unnormalized)."""
    r, v = weights.shape
    device = weights.device
    n_full = v // _BLOCK
    parts = []
    if n_full:
        parts.append(weights[:, : n_full * _BLOCK].reshape(r, n_full, _BLOCK).sum(-1))
    if v % _BLOCK:
        parts.append(weights[:, n_full * _BLOCK :].sum(-1, keepdim=True))
    block_mass = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    n_blocks = block_mass.shape[1]

    block_noise = exponential_noise(
        _row_keys(seeds, steps, _BLOCK_DOMAIN), torch.arange(n_blocks, device=device)
    )
    block = (block_mass / block_noise).argmax(-1)

    token = block[:, None] * _BLOCK + torch.arange(_BLOCK, device=device)[None, :]
    valid = token < v
    w = weights.gather(1, token.clamp(max=v - 1)) * valid
    token_noise = exponential_noise(_row_keys(seeds, steps, _TOKEN_DOMAIN), token)
    choice = (w / token_noise).argmax(-1, keepdim=True)
    return token.gather(1, choice).squeeze(1)


def sampling_weights(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    *,
    need_temperature: bool = True,
    need_top_k: bool = True,
    need_top_p: bool = True,
    need_min_p: bool = True,
) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: [R, V] probabilities, 0 outside each row's support.

    ``logits`` [R, V] float32 may be modified in place. The need_* flags only skip work: a row whose
    parameters disable a stage gets bit-identical weights whether or not the stage runs.
    """
    if need_temperature:
        logits = logits.div_(temperatures[:, None])
    probs = torch.softmax(logits, dim=-1)
    threshold = None
    if need_top_k or need_top_p:
        threshold = _top_k_top_p_threshold(probs, top_ks, top_ps, need_top_k, need_top_p)
    if need_min_p:
        # min-p compares with the most likely token, which top-k/top-p always keep, so the ratio is the
        # same as in transformers' renormalized MinPLogitsWarper, and the two filters combine into one
        # threshold (a token must pass both).
        min_p_threshold = min_ps[:, None] * probs.amax(-1, keepdim=True)
        threshold = min_p_threshold if threshold is None else torch.maximum(threshold, min_p_threshold)
    if threshold is not None:
        probs.masked_fill_(probs < threshold, 0.0)
    return probs


# --------------------------------------------------------------------------------------------------
# Greedy
# --------------------------------------------------------------------------------------------------

# torch's CPU argmax walks each row with a scalar loop (~1 ns a value), where amax is vectorized: 64 x 32000
# float32 took 2.9-5.3 ms by argmax and 0.6-1.4 ms by blocks (measured, 1-2 threads, a 2-core AVX2 EPYC).
# The blocks cost eight small ops, ~20-25 us in all, so below ~64K values one argmax is cheaper. Measured
# on a 2-core Zen 4 EPYC, float32, us, argmax / blocks: 1 x 151936 (the 0.5B shape's batch-1 decode) 151 /
# 57; 8 x 151936 536 / 90; 4 x 32000 67 / 47; 1 x 32000 33 / 25; 8 x 8192 31 / 33; 1 x 16384 15 / 26.
_ARGMAX_BLOCK = 256
_ARGMAX_MIN_VALUES = 1 << 16
# numpy's float32 argmax is vectorized and single-threaded: no wake-up of torch's thread pool, which a
# decode step pays after its last parallel op went idle. Warm, us, torch argmax / blocks / numpy (2-core
# Zen 4): 1 x 32000 28 / 28 / 4; 8 x 32000 108 / 39 / 19; 64 x 32000 842 / 130 / 128; 1 x 151936 126 / 38 /
# 11; 64 x 151936 4017 / 716 / 1073: up to ~2M values numpy is the fastest. Its argmax also returns the
# first maximal index, and the first NaN where a row has one, as torch's does. Inside the engine the gain is
# small: the small shape's batch-1 argmax took 43-48 us against torch's 51-53 (medians of 64 steps), the
# rows being fresh from the LM head's threads rather than warm.
_NUMPY_ARGMAX_MAX_VALUES = 1 << 21


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) for [B, V] logits, the same index (the first maximal one; NaN counts as the maximum).
    On CPU, float32 up to _NUMPY_ARGMAX_MAX_VALUES goes to numpy's argmax; larger (or bf16) inputs take each
    block's max (vectorized), the first block holding the row's max, the first max inside it. The first
    maximal block holds the row's first maximal element, so the two agree exactly."""
    b, v = x.shape
    if x.dtype == torch.float32 and x.device.type == "cpu" and b * v <= _NUMPY_ARGMAX_MAX_VALUES:
        return torch.from_numpy(x.numpy().argmax(-1))
    n = v // _ARGMAX_BLOCK
    if b * v < _ARGMAX_MIN_VALUES or n < 32 or x.device.type != "cpu" or x.stride(-1) != 1:
        return x.argmax(-1)
    blocks = x[:, : n * _ARGMAX_BLOCK].view(b, n, _ARGMAX_BLOCK).amax(-1)
    if v % _ARGMAX_BLOCK:  # the short last block
        blocks = torch.cat([blocks, x[:, n * _ARGMAX_BLOCK :].amax(-1, keepdim=True)], dim=1)
    start = blocks.argmax(-1, keepdim=True) * _ARGMAX_BLOCK
    # The last block may be short: its missing columns read column V - 1 again, after its real place.
    cols = (start + torch.arange(_ARGMAX_BLOCK, device=x.device)).clamp_(max=v - 1)
    return cols.gather(1, x.gather(1, cols).argmax(-1, keepdim=True)).squeeze(1)


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32: raw log-softmax at the chosen token
    top_logprobs_ids: torch.Tensor | None  # [B, K] int64, most likely first
    top_logprobs_vals: torch.Tensor | None  # [B, K] float32


class Sampler:
    """Every input of a step is in the ``SamplingBatch``; the only state is a reusable float32
    scratch buffer (one Sampler per model runner; not for concurrent use from several threads)."""

    def __init__(self) -> None:
        # On CPU a fresh [B, V] float32 tensor per step page-faults in ~25 ms for 64 x 152k (glibc
        # hands large blocks back to the OS); copying into a kept buffer costs ~7 ms.
        self._scratch: torch.Tensor | None = None

    def __call__(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        *,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.batch_size or logits.shape[1] != batch.vocab_size:
            raise ValueError(
                f"Sampler: logits must be [{batch.batch_size}, {batch.vocab_size}], got {list(logits.shape)}"
            )
        need_logprobs = return_logprob or top_logprobs_num > 0
        fast = batch.all_greedy and not batch.need_logit_processing
        if fast and not need_logprobs and logits.dtype == torch.float32:
            return SamplerOutput(first_argmax(logits), None, None, None)

        # One float32 copy serves everything below; argmax over float32 is also ~2x faster on CPU
        # than over bf16. The stages after the logprobs write into it in place, never into `logits`.
        x = self._float_copy(logits)
        raw_lp = top_ids = top_vals = logprobs = None
        if need_logprobs:
            # Of the raw logits: before penalties and temperature, like vLLM's default.
            raw_lp = torch.log_softmax(x, dim=-1)
        if top_logprobs_num > 0:
            top_ids = top_token_ids(x, min(top_logprobs_num, x.shape[1]))
            top_vals = raw_lp.gather(1, top_ids)

        if fast:
            next_ids = first_argmax(x)
        else:
            if batch.need_logit_processing:
                apply_penalties(x, batch)
            next_ids = self._choose(x, batch)

        if return_logprob:
            logprobs = raw_lp.gather(1, next_ids[:, None]).squeeze(1)
        return SamplerOutput(next_ids, logprobs, top_ids, top_vals)

    def argmax(self, logits: torch.Tensor, batch_size: int) -> SamplerOutput:
        """Every row greedy with nothing that reads or changes its logits (no penalties, logit_bias,
        min_new_tokens ban, grammar or logprobs): the same tokens as ``__call__`` with such a batch, without
        building one."""
        if logits.dim() != 2 or logits.shape[0] != batch_size:
            raise ValueError(f"Sampler.argmax: logits must be [{batch_size}, V], got {list(logits.shape)}")
        x = logits if logits.dtype == torch.float32 else self._float_copy(logits)
        return SamplerOutput(first_argmax(x), None, None, None)

    def _float_copy(self, logits: torch.Tensor) -> torch.Tensor:
        b, v = logits.shape
        s = self._scratch
        if s is None or s.device != logits.device or s.shape[1] != v or s.shape[0] < b:
            s = self._scratch = torch.empty(b, v, dtype=torch.float32, device=logits.device)
        out = s[:b]
        out.copy_(logits)
        return out

    @staticmethod
    def _choose(work: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if batch.all_greedy:
            return first_argmax(work)
        rows = batch.sample_rows
        if rows is None:
            sub, next_ids = work, None
        else:
            # Greedy rows take the argmax of the processed logits; the rest are overwritten below.
            next_ids = first_argmax(work)
            sub = work[rows]

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t[rows]

        weights = sampling_weights(
            sub,
            pick(batch.temperatures),
            pick(batch.top_ks),
            pick(batch.top_ps),
            pick(batch.min_ps),
            need_temperature=batch.need_temperature,
            need_top_k=batch.need_top_k,
            need_top_p=batch.need_top_p,
            need_min_p=batch.need_min_p,
        )
        sampled = _race(weights, pick(batch.seeds), pick(batch.steps))
        if next_ids is None:
            return sampled
        next_ids[rows] = sampled
        return next_ids


def top_token_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k most likely token ids per row, most likely first, ties in id order (so [:, 0] == argmax)."""
    vals, ids = logits.topk(k, dim=-1, sorted=True)
    # topk does not promise an order among equal values; re-sort the k candidates by (value desc, id asc).
    ids, order = ids.sort(dim=-1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)
    # With more than k tied maxima topk may not have picked the lowest id at all.
    ids[:, 0] = logits.argmax(-1)
    return ids
