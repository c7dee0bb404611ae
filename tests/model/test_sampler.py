import math
import random
from collections.abc import Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from radixlm.model.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    exponential_noise,
    sampling_weights,
    uniform_noise,
)
from radixlm.sampling_params import SamplingParams

sampler = Sampler()


class LengthOnly(Sequence):
    """A token list whose contents must not be read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        raise AssertionError("token contents read for a row that does not need them")


def build(params, *, seeds=None, prompt_ids=None, output_ids=None, steps=None, eos=(), vocab_size):
    b = len(params)
    if output_ids is None:
        # Only the length of output_ids is read for rows without penalties.
        output_ids = [LengthOnly(s) for s in steps] if steps is not None else [[] for _ in range(b)]
    return SamplingBatch.build(
        params,
        seeds=list(range(b)) if seeds is None else seeds,
        prompt_ids=[[] for _ in range(b)] if prompt_ids is None else prompt_ids,
        output_ids=output_ids,
        eos_token_ids=list(eos),
        vocab_size=vocab_size,
        device=torch.device("cpu"),
    )


def sample(logits, params, **kw):
    return sampler(logits, build(params, vocab_size=logits.shape[1], **kw)).next_token_ids


# ------------------------------------------------------------------------------------------------
# Greedy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 1000, generator=g) * 3).to(dtype)
    params = [SamplingParams(temperature=0)] * 3 + [SamplingParams(temperature=0.5, top_k=1)] * 3
    out = sample(logits, params)
    assert out.dtype == torch.int64
    assert torch.equal(out, logits.float().argmax(-1))


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 700, generator=g)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_p=0.5)] * 2
    params.append(SamplingParams(temperature=0))
    out = sample(logits, params)
    greedy = [0, 2, 4]
    assert torch.equal(out[greedy], logits[greedy].argmax(-1))


def test_greedy_ties_take_lowest_index():
    logits = torch.zeros(2, 50)
    logits[0, [7, 3, 40]] = 5.0
    logits[1, [49, 10]] = 2.0
    # With a penalty present the slow path runs; it must break ties the same way.
    for extra in ({}, {"repetition_penalty": 1.5}):
        out = sample(logits, [SamplingParams(temperature=0, **extra)] * 2, prompt_ids=[[0], [0]])
        assert out.tolist() == [3, 10]


# ------------------------------------------------------------------------------------------------
# Seeds and batch invariance
# ------------------------------------------------------------------------------------------------

V_INV = 5000  # > 4 * 1024, so top-p can take the partial-topk path as well as the full sort


def random_params(rng: random.Random) -> SamplingParams:
    kind = rng.randrange(7)
    if kind == 0:
        return SamplingParams(temperature=0)
    if kind == 1:
        return SamplingParams(temperature=rng.choice([0.5, 1.0, 1.7]))
    if kind == 2:
        return SamplingParams(temperature=0.8, top_k=rng.choice([2, 40, 900, 3000]))
    if kind == 3:
        return SamplingParams(temperature=0.9, top_p=rng.choice([0.3, 0.9, 0.999]))
    if kind == 4:
        return SamplingParams(temperature=1.1, min_p=rng.choice([0.01, 0.2]))
    if kind == 5:
        return SamplingParams(temperature=0.7, top_k=50, top_p=0.8, min_p=0.05)
    return SamplingParams(
        temperature=rng.choice([0.0, 1.0]),
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.2,
        min_new_tokens=rng.choice([0, 3]),
        stop_token_ids=[4],
    )


def random_logits(g: torch.Generator, n: int) -> torch.Tensor:
    # A mix of peaked and flat rows: flat rows push top-p off the partial-topk path.
    scale = torch.tensor([8.0, 1.0, 0.1, 3.0])[torch.randint(0, 4, (n, 1), generator=g)]
    return torch.randn(n, V_INV, generator=g) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_depends_only_on_own_row_seed_and_step(dtype):
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for trial in range(24):
        target_params = random_params(rng)
        target_logits = random_logits(g, 1).to(dtype)
        target_prompt = [rng.randrange(V_INV) for _ in range(5)]
        target_output = [rng.randrange(V_INV) for _ in range(rng.randrange(0, 4))]
        target_seed = rng.randrange(2**63)
        alone = sample(
            target_logits,
            [target_params],
            seeds=[target_seed],
            prompt_ids=[target_prompt],
            output_ids=[target_output],
            eos=[1, 2],
        )
        for b in (3, 8):
            others = [random_params(rng) for _ in range(b - 1)]
            pos = rng.randrange(b)
            params = others[:pos] + [target_params] + others[pos:]
            logits = random_logits(g, b).to(dtype)
            logits[pos] = target_logits[0]
            seeds = [rng.randrange(2**63) for _ in range(b)]
            seeds[pos] = target_seed
            prompts = [[rng.randrange(V_INV) for _ in range(5)] for _ in range(b)]
            prompts[pos] = target_prompt
            outputs = [[rng.randrange(V_INV) for _ in range(rng.randrange(0, 4))] for _ in range(b)]
            outputs[pos] = target_output
            out = sample(logits, params, seeds=seeds, prompt_ids=prompts, output_ids=outputs, eos=[1, 2])
            assert out[pos] == alone[0], (trial, b, target_params)


def test_truncated_weights_of_a_row_do_not_depend_on_the_path_taken():
    # Other rows decide whether top-k/top-p run on a partial topk or a full sort, and how large the
    # topk is; the row's kept set and weights must be bit-identical on every path.
    g = torch.Generator().manual_seed(11)
    row = torch.randn(1, V_INV, generator=g) * 3.0
    p = SamplingParams(temperature=0.9, top_p=0.95, min_p=0.001)
    others = [
        [],
        [SamplingParams(top_k=3000)],  # stage k >= V/4: full sort for everyone
        [SamplingParams(top_k=700)],  # a first stage of 700 instead of 64
        [SamplingParams(top_p=0.99)],  # a flat row that needs the per-row sort
    ]
    ref = None
    for extra in others:
        logits = torch.cat([row, torch.randn(len(extra), V_INV, generator=g) * 0.1])
        batch = build([p, *extra], vocab_size=V_INV)
        w = sampling_weights(logits.clone(), batch.temperatures, batch.top_ks, batch.top_ps, batch.min_ps)[0]
        if ref is None:
            ref = w
            assert 64 < int((w > 0).sum()) < 1024  # the nucleus needs the second stage when alone
        assert torch.equal(w, ref), extra


def test_same_seed_and_step_repeat_and_global_rng_untouched():
    logits = torch.zeros(1, 300)  # uniform: every draw is pure noise
    state = torch.get_rng_state()
    a = [sample(logits, [SamplingParams()], seeds=[7], steps=[s]).item() for s in range(20)]
    b = [sample(logits, [SamplingParams()], seeds=[7], steps=[s]).item() for s in range(20)]
    assert a == b
    assert torch.equal(state, torch.get_rng_state())


def test_different_seeds_and_steps_give_different_samples():
    logits = torch.zeros(1, 1000)
    seq = {
        seed: [sample(logits, [SamplingParams()], seeds=[seed], steps=[s]).item() for s in range(60)]
        for seed in (0, 1, 2**40, -5)
    }
    for seed, tokens in seq.items():
        assert len(set(tokens)) > 50, seed  # steps give fresh draws
    seeds = list(seq)
    for i in range(len(seeds)):
        for j in range(i + 1, len(seeds)):
            same = sum(x == y for x, y in zip(seq[seeds[i]], seq[seeds[j]], strict=True))
            assert same <= 3, (seeds[i], seeds[j])


def test_huge_seeds_are_accepted():
    logits = torch.zeros(3, 10)
    out = sample(logits, [SamplingParams()] * 3, seeds=[2**100, -(2**90), 2**64 - 1])
    assert out.shape == (3,)


# ------------------------------------------------------------------------------------------------
# Support of top-k / top-p / min-p
# ------------------------------------------------------------------------------------------------


def check_in_support(logits: torch.Tensor, p: SamplingParams, token: int) -> None:
    """Necessary conditions for `token` to be in the support, in float64 with a little slack."""
    x = logits.double()
    assert math.isfinite(x[token].item()), "sampled a -inf token"
    v = x.numel()
    k = v if p.top_k < 0 else min(p.top_k, v)
    # Logits closer than float32 can tell apart after the temperature and softmax tie there (hypothesis
    # found 0 and 6e-30): only a token clearly above this one counts against top-k.
    slack = 1e-6 * (1.0 + x.abs().max().item())
    assert int((x > x[token] + slack).sum()) < k, "outside top-k"
    probs = torch.softmax(x / p.temperature, dim=0)
    kth = probs.sort(descending=True).values[k - 1]
    in_k = probs >= kth
    renorm = torch.where(in_k, probs, 0.0) / probs[in_k].sum()
    # The same float32 ties as for top-k (hypothesis found 0 and 2.2e-16 at temperature 0.05, top_p 0.3).
    mass_above = renorm[x > x[token] + slack].sum().item()
    assert mass_above < p.top_p + 1e-5, "outside top-p"
    assert probs[token] >= p.min_p * probs.max() * (1 - 1e-5), "outside min-p"


logit_values = st.one_of(
    st.floats(-30, 30, allow_nan=False),
    st.sampled_from([0.0, 1.0, 2.5, float("-inf")]),  # repeated values make ties
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(logit_values, min_size=1, max_size=600),
    temperature=st.sampled_from([0.05, 0.5, 1.0, 2.0]),
    top_k=st.sampled_from([-1, 1, 2, 3, 10, 100]),
    top_p=st.sampled_from([1.0, 0.95, 0.7, 0.3, 0.01]),
    min_p=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    bf16=st.booleans(),
)
def test_never_samples_outside_support(values, temperature, top_k, top_p, min_p, bf16):
    if all(v == float("-inf") for v in values):
        values[0] = 0.0
    logits = torch.tensor(values, dtype=torch.float32)
    if bf16:
        logits = logits.bfloat16().float()
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    n = 48  # many draws of the same row: one per seed
    out = sample(logits.expand(n, -1).contiguous(), [p] * n, seeds=list(range(n)), steps=[3] * n)
    for token in set(out.tolist()):
        check_in_support(logits, p, token)


def test_support_on_a_large_vocab_with_both_sort_paths():
    g = torch.Generator().manual_seed(3)
    v = 20000
    for scale in (10.0, 0.5):  # peaked: nucleus inside the partial topk; flat: full sort
        logits = torch.randn(16, v, generator=g) * scale
        for p in (
            SamplingParams(top_p=0.9),
            SamplingParams(top_k=30, top_p=0.5),
            SamplingParams(temperature=0.6, min_p=0.1),
        ):
            out = sample(logits, [p] * 16, steps=[1] * 16)
            for row, token in enumerate(out.tolist()):
                check_in_support(logits[row], p, token)


def test_top_k_keeps_every_token_tied_at_the_boundary_like_transformers():
    # transformers' TopKLogitsWarper removes only scores below the k-th largest, so ties survive.
    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    n = 512
    out = sample(logits.expand(n, -1).contiguous(), [SamplingParams(top_k=2)] * n, seeds=list(range(n)))
    assert set(out.tolist()) == {0, 1, 2, 3, 5}


# ------------------------------------------------------------------------------------------------
# Distribution
# ------------------------------------------------------------------------------------------------


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    return float(((counts - expected) ** 2 / expected).sum())


# Critical values of chi-square at p = 1e-6; the seeds are fixed, so these tests cannot flake.
CHI2_CRIT = {9: 46.9, 3: 30.7, 12: 52.6}


def test_distribution_matches_softmax_over_seeds():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.8])
    n = 20000
    out = sample(logits.expand(n, -1).contiguous(), [SamplingParams()] * n, seeds=list(range(n)))
    counts = torch.bincount(out, minlength=10).double()
    assert chi_square(counts, torch.softmax(logits.double(), 0)) < CHI2_CRIT[9]


def test_distribution_matches_softmax_over_steps_with_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.8])
    n = 20000
    p = SamplingParams(temperature=0.7)
    out = sample(logits.expand(n, -1).contiguous(), [p] * n, seeds=[123] * n, steps=list(range(n)))
    counts = torch.bincount(out, minlength=10).double()
    assert chi_square(counts, torch.softmax(logits.double() / 0.7, 0)) < CHI2_CRIT[9]


def test_distribution_across_blocks_of_a_large_vocab():
    # Mass on tokens spread over many 256-token blocks, including the ragged last block.
    v = 1100
    hot = [0, 255, 256, 300, 511, 640, 777, 900, 1023, 1024, 1050, 1099]
    logits = torch.full((v,), -4.0)
    logits[hot] = torch.linspace(0.0, 2.0, len(hot))
    n = 20000
    out = sample(
        logits.expand(n, -1).contiguous(), [SamplingParams()] * n, seeds=list(range(n)), steps=[5] * n
    )
    probs = torch.softmax(logits.double(), 0)
    is_hot = torch.zeros(v, dtype=torch.bool)
    is_hot[hot] = True
    counts_all = torch.bincount(out, minlength=v).double()
    counts = torch.cat([counts_all[hot], counts_all[~is_hot].sum()[None]])
    expected = torch.cat([probs[hot], probs[~is_hot].sum()[None]])
    assert chi_square(counts, expected) < CHI2_CRIT[12]


def test_top_k_distribution_is_renormalized():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.0])
    n = 20000
    p = SamplingParams(top_k=4)
    out = sample(logits.expand(n, -1).contiguous(), [p] * n, seeds=list(range(n)))
    counts = torch.bincount(out, minlength=6).double()
    assert counts[4:].sum() == 0
    assert chi_square(counts[:4], torch.softmax(logits[:4].double(), 0)) < CHI2_CRIT[3]


# ------------------------------------------------------------------------------------------------
# Penalties and min_new_tokens
# ------------------------------------------------------------------------------------------------


def processed(logits, params, **kw):
    batch = build(params, vocab_size=logits.shape[1], **kw)
    return apply_penalties(logits.clone(), batch)


def test_repetition_penalty_matches_transformers():
    g = torch.Generator().manual_seed(4)
    v = 300
    logits = torch.randn(4, v, generator=g) * 4
    prompts = [[1, 2, 2, 5], [7, 8], [10, 11, 12], [299, 3]]
    outputs = [[5, 9], [], [10, 10, 200], [0]]
    penalties = [1.3, 1.0, 0.7, 2.0]
    params = [SamplingParams(temperature=0, repetition_penalty=r) for r in penalties]
    got = processed(logits, params, prompt_ids=prompts, output_ids=outputs)
    for row in range(4):
        if penalties[row] == 1.0:
            assert torch.equal(got[row], logits[row])
            continue
        proc = RepetitionPenaltyLogitsProcessor(penalty=penalties[row])
        ids = torch.tensor([prompts[row] + outputs[row]])
        want = proc(ids, logits[row : row + 1].clone())[0]
        assert torch.equal(got[row], want), row


def test_frequency_and_presence_penalties_follow_openai_formula():
    g = torch.Generator().manual_seed(5)
    v = 50
    logits = torch.randn(3, v, generator=g)
    prompts = [[1, 2, 3], [4], [5]]  # prompt tokens are not counted
    outputs = [[3, 3, 7, 3], [], [1, 1]]
    params = [
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(frequency_penalty=1.0),
        SamplingParams(frequency_penalty=-0.5, presence_penalty=-1.0),
    ]
    got = processed(logits, params, prompt_ids=prompts, output_ids=outputs)
    for row, p in enumerate(params):
        counts = torch.bincount(torch.tensor(outputs[row], dtype=torch.long), minlength=v).float()
        want = logits[row] - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        torch.testing.assert_close(got[row], want, rtol=0, atol=1e-6)


def test_repetition_then_frequency_presence_only_on_penalized_rows():
    v = 20
    logits = torch.linspace(-3, 3, v).expand(3, -1).contiguous()
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5),
        SamplingParams(temperature=0),
    ]
    got = processed(logits, params, prompt_ids=[[0], [0, 19], [1]], output_ids=[[2], [19, 19], [3]])
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])
    want = logits[1].clone()
    want[0] = want[0] * 2.0  # negative: multiplied
    want[19] = want[19] / 2.0 - 1.0 * 2 - 0.5  # positive: divided, then 2 occurrences + presence
    torch.testing.assert_close(got[1], want, rtol=0, atol=1e-6)


def test_prompt_ids_beyond_vocab_are_ignored():
    logits = torch.ones(1, 10)
    got = processed(logits, [SamplingParams(repetition_penalty=2.0)], prompt_ids=[[3, 10, 999]])
    want = torch.ones(10)
    want[3] = 0.5
    assert torch.equal(got[0], want)


def test_min_new_tokens_bans_eos_and_stop_token_ids():
    v = 30
    eos = 5
    logits = torch.zeros(1, v)
    logits[0, eos] = 10.0
    logits[0, 6] = 9.0
    logits[0, 7] = 8.0
    p = SamplingParams(temperature=0, min_new_tokens=3, stop_token_ids=[6])
    for step, want in [(0, 7), (2, 7), (3, eos)]:
        assert sample(logits, [p], eos=[eos], steps=[step]).item() == want, step
    got = processed(logits, [p], eos=[eos], steps=[1])
    assert got[0, eos] == float("-inf") and got[0, 6] == float("-inf")
    assert torch.isfinite(got[0, [i for i in range(v) if i not in (5, 6)]]).all()
    # Sampling rows are held back too.
    q = SamplingParams(temperature=1.0, min_new_tokens=2, stop_token_ids=[6])
    out = sample(
        logits.expand(64, -1).contiguous(), [q] * 64, eos=[eos], steps=[1] * 64, seeds=list(range(64))
    )
    assert not ({eos, 6} & set(out.tolist()))


def test_min_new_tokens_with_ignore_eos_does_not_ban_eos():
    logits = torch.zeros(1, 10)
    logits[0, 2] = 5.0
    p = SamplingParams(temperature=0, min_new_tokens=4, ignore_eos=True, stop_token_ids=[3])
    got = processed(logits, [p], eos=[2], steps=[0])
    assert got[0, 2] == 5.0 and got[0, 3] == float("-inf")


# ------------------------------------------------------------------------------------------------
# Logprobs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax(dtype):
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(4, 400, generator=g) * 3).to(dtype)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.5, top_p=0.8),
        SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=1.0),
        SamplingParams(top_k=5),
    ]
    batch = build(
        params, vocab_size=400, prompt_ids=[[1], [2], [3, 4], [5]], output_ids=[[1], [2], [4, 4], [5]]
    )
    out = sampler(logits, batch, return_logprob=True, top_logprobs_num=6)
    raw_lp = torch.log_softmax(logits.float(), -1)
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(out.logprobs, raw_lp.gather(1, out.next_token_ids[:, None]).squeeze(1))
    assert out.top_logprobs_ids.shape == (4, 6) and out.top_logprobs_ids.dtype == torch.int64
    assert torch.equal(out.top_logprobs_vals, raw_lp.gather(1, out.top_logprobs_ids))
    assert (out.top_logprobs_vals[:, :-1] >= out.top_logprobs_vals[:, 1:]).all()
    assert torch.equal(out.top_logprobs_vals[:, 0], raw_lp.max(-1).values)
    assert out.top_logprobs_ids[0, 0] == out.next_token_ids[0]  # greedy row: its choice comes first


def test_top_logprobs_first_entry_is_greedy_choice_under_ties():
    logits = torch.zeros(1, 64)
    logits[0, [40, 9, 33]] = 1.0
    out = sampler(logits, build([SamplingParams(temperature=0)], vocab_size=64), top_logprobs_num=2)
    assert out.next_token_ids.item() == 9
    assert out.top_logprobs_ids.tolist() == [[9, 33]]
    # More tied maxima than requested entries: still the argmax first.
    logits = torch.zeros(1, 64)
    out = sampler(logits, build([SamplingParams(temperature=0)], vocab_size=64), top_logprobs_num=3)
    assert out.top_logprobs_ids[0, 0].item() == 0 == out.next_token_ids.item()


def test_logprobs_only_when_asked():
    logits = torch.randn(2, 30)
    out = sampler(logits, build([SamplingParams()] * 2, vocab_size=30))
    assert out.logprobs is None and out.top_logprobs_ids is None and out.top_logprobs_vals is None
    out = sampler(logits, build([SamplingParams()] * 2, vocab_size=30), top_logprobs_num=100)
    assert out.logprobs is None and out.top_logprobs_ids.shape == (2, 30)


# ------------------------------------------------------------------------------------------------
# Plumbing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=0.7, top_p=0.9)],
        [SamplingParams(temperature=0, repetition_penalty=1.2, min_new_tokens=5)],
        [SamplingParams(temperature=1.3, min_p=0.1), SamplingParams(temperature=0)],
    ],
)
def test_input_logits_are_not_modified(params):
    logits = torch.randn(len(params), 100)
    before = logits.clone()
    sampler(
        logits,
        build(
            params, vocab_size=100, prompt_ids=[[1, 2]] * len(params), output_ids=[[3]] * len(params), eos=[0]
        ),
        return_logprob=True,
    )
    assert torch.equal(logits, before)


def test_shape_mismatch_raises():
    batch = build([SamplingParams()] * 2, vocab_size=10)
    with pytest.raises(ValueError, match="logits"):
        sampler(torch.zeros(3, 10), batch)
    with pytest.raises(ValueError, match="logits"):
        sampler(torch.zeros(2, 11), batch)
    with pytest.raises(ValueError, match="same length"):
        SamplingBatch.build([SamplingParams()], [0, 1], [[]], [[]], [], 10, "cpu")


def test_build_reads_only_lengths_in_the_common_case():
    params = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_p=0.5, min_new_tokens=2)]
    batch = SamplingBatch.build(
        params,
        seeds=[1, 2, 3],
        prompt_ids=[LengthOnly(100)] * 3,
        output_ids=[LengthOnly(4)] * 3,
        eos_token_ids=[0],
        vocab_size=10,
        device="cpu",
    )
    assert batch.steps.tolist() == [4, 4, 4]
    assert not batch.need_penalties and not batch.need_min_tokens_ban
    assert batch.need_top_p and not batch.need_top_k and not batch.need_min_p and not batch.all_greedy
    assert batch.sample_rows.tolist() == [0, 2]
    assert batch.top_ks.tolist() == [10, 10, 10]


def test_uniform_noise_is_strictly_inside_unit_interval():
    keys = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 12345], dtype=torch.int64)
    index = torch.arange(200000, dtype=torch.int64)
    u = uniform_noise(keys, index)
    assert u.dtype == torch.float32 and u.shape == (6, 200000)
    assert (u > 0).all() and (u < 1).all()
    # Rough quality: moments of U(0, 1) and no obvious correlation between neighbours.
    assert abs(u.mean().item() - 0.5) < 0.002
    assert abs(u.var().item() - 1 / 12) < 0.001
    corr = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.01
    # Bucket uniformity per key.
    for row in u:
        counts = torch.histc(row, bins=20, min=0, max=1).double()
        assert chi_square(counts, torch.full((20,), 1 / 20, dtype=torch.double)) < 60
    e = exponential_noise(keys, index)
    assert torch.isfinite(e).all() and (e > 0).all()
    assert abs(e.mean().item() - 1.0) < 0.01


# ------------------------------------------------------------------------------------------------
# logit_bias
# ------------------------------------------------------------------------------------------------


def test_logit_bias_forces_and_bans_tokens_under_greedy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 500, generator=g) * 3
    top = logits.argmax(-1)
    params = [
        SamplingParams(temperature=0, logit_bias={123: 100}),  # +100 wins over any logit here
        SamplingParams(temperature=0, logit_bias={int(top[1]): -100}),  # the argmax is banned
        SamplingParams(temperature=0),  # no bias: untouched, in the same batch
    ]
    out = sample(logits, params)
    assert out[0] == 123
    second = logits[1].clone()
    second[top[1]] -= 100
    assert out[1] == second.argmax() and out[1] != top[1]
    assert out[2] == top[2]


def test_logit_bias_applies_to_sampled_rows_and_leaves_logprobs_raw():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 300, generator=g)
    params = [SamplingParams(temperature=0.8, seed=s, logit_bias={7: 100}) for s in range(4)]
    batch = build(params, vocab_size=300)
    out = sampler(logits, batch, return_logprob=True)
    assert out.next_token_ids.tolist() == [7, 7, 7, 7]
    # Reported logprobs are of the raw logits (before the bias), like vLLM's default.
    raw = torch.log_softmax(logits, -1)[:, 7]
    torch.testing.assert_close(out.logprobs, raw)


def test_no_logit_bias_keeps_the_plain_argmax_fast_path():
    batch = build([SamplingParams(temperature=0)] * 2, vocab_size=50)
    assert batch.bias_index is None and not batch.need_logit_processing
    biased = build(
        [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={3: 1})], vocab_size=50
    )
    assert biased.need_logit_processing and biased.bias_index.tolist() == [50 + 3]
