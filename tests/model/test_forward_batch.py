"""ForwardBatch.prompt_singles: which one-token spans compute a prompt token (attended as prompt spans) and
which decode an output token (the in-place decode kernel may take those)."""

from __future__ import annotations

from radixlm.model.forward_batch import ForwardBatch
from radixlm.model.step_input import SamplingInput, SpanInput, StepInput
from radixlm.sampling_params import SamplingParams


def _sampling(num_output_tokens: int) -> SamplingInput:
    return SamplingInput(SamplingParams(), seed=0, num_output_tokens=num_output_tokens)


def test_a_pure_decode_step_has_no_prompt_singles() -> None:
    spans = [SpanInput(row=r, start=10 + r, token_ids=[5], slots=[100 + r], samples=True) for r in range(3)]
    step = StepInput(spans, sampling=[_sampling(1), _sampling(4), _sampling(2)])
    assert ForwardBatch.prompt_singles_of(step) == frozenset()


def test_prompt_tails_and_one_token_chunks_are_prompt_singles() -> None:
    spans = [
        SpanInput(row=0, start=9, token_ids=[5], slots=[1], samples=True),  # decode: its 3rd output token
        SpanInput(row=1, start=7, token_ids=[6], slots=[2], samples=True),  # a cached prompt's last token
        SpanInput(row=2, start=3, token_ids=[7], slots=[3], samples=False),  # a prompt chunk of one
        SpanInput(row=3, start=0, token_ids=[1, 2, 3], slots=[4, 5, 6], samples=True),  # a whole prompt
        SpanInput(row=4, start=20, token_ids=[8], slots=[7], samples=True),  # decode
    ]
    step = StepInput(spans, sampling=[_sampling(2), _sampling(0), _sampling(0), _sampling(5)])
    assert ForwardBatch.prompt_singles_of(step) == frozenset({1, 2})
