"""The greedy pick: first_argmax (by blocks on CPU) is torch's argmax, index for index, and Sampler.argmax
(the plain greedy step's sampler) gives the tokens the full sampler gives for greedy rows."""

from __future__ import annotations

import pytest
import torch

from radixlm.model.sampler import Sampler, SamplingBatch, first_argmax
from radixlm.sampling_params import SamplingParams


@pytest.mark.parametrize("vocab", [7, 2048, 8192, 8449, 8703, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_argmax_is_argmax(vocab: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(20, vocab, generator=g)  # enough rows for the block path
    # Ties everywhere (few distinct values), a row of -inf, NaNs (argmax takes the first), a maximum in
    # the short last block, and one in the first column.
    ties = torch.randint(0, 3, (20, vocab), generator=g).float()
    ties[0] = float("-inf")
    ties[1, vocab // 2] = ties[1, vocab - 1] = float("nan")
    ties[2, vocab - 1] = 9.0
    ties[3, 0] = 9.0
    for t in (x, ties, x[:, : vocab - 3 if vocab > 3 else vocab]):
        t = t.to(dtype)
        assert torch.equal(first_argmax(t), t.argmax(-1))


@pytest.mark.parametrize("rows", [1, 3])
def test_first_argmax_of_few_rows_over_a_large_vocab_is_argmax(rows: int) -> None:
    """One decode row over a Qwen-sized vocabulary takes the block path too (over 64K values)."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 151936, generator=g)
    x[0, 151935] = x[0].max() + 1  # in the short last block
    if rows > 1:
        x[1, 7] = x[1, 90000] = x[1].max() + 1  # a tie: the first wins
    for t in (x, x.bfloat16()):
        assert torch.equal(first_argmax(t), t.argmax(-1))


def test_first_argmax_of_many_float32_rows_takes_the_blocks_and_is_argmax() -> None:
    """Past numpy's range (2M values) float32 rows take the block path: ties, NaN and the last block."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 151936, generator=g)
    x[0, 151935] = x[0].max() + 1
    x[1, 7] = x[1, 90000] = x[1].max() + 1
    x[2, 5000] = x[2, 100] = float("nan")
    x[3] = float("-inf")
    assert torch.equal(first_argmax(x), x.argmax(-1))


def test_first_argmax_returns_int64_like_torch() -> None:
    x = torch.randn(2, 100)
    assert first_argmax(x).dtype == torch.int64


def test_sampler_argmax_matches_the_greedy_sampler() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4096, generator=g)
    logits[2, 100] = logits[2, 3000] = logits[2].max() + 1  # a tie: the first wins
    params = [SamplingParams(temperature=0)] * 5
    batch = SamplingBatch.build(params, [1] * 5, [[]] * 5, [[]] * 5, [0], 4096, "cpu")
    full = Sampler()(logits, batch).next_token_ids
    for x in (logits, logits.bfloat16()):
        assert torch.equal(Sampler().argmax(x, 5).next_token_ids, Sampler()(x, batch).next_token_ids)
    assert torch.equal(Sampler().argmax(logits, 5).next_token_ids, full) and full[2].item() == 100
    with pytest.raises(ValueError, match="Sampler.argmax"):
        Sampler().argmax(logits, 4)
