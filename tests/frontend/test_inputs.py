"""frontend/inputs.py: every prompt check in one place, n as one group per prompt, rid naming."""

from __future__ import annotations

import pytest

from radixlm.frontend.inputs import prepare_call
from radixlm.sampling_params import SamplingParams

INFO = {"vocab_size": 100, "context_length": 50, "kv_capacity": 30}


def _prepare(prompt=None, input_ids=None, sampling_params=None, rid=None, in_use=(), **kw):
    return prepare_call(
        prompt,
        input_ids,
        sampling_params,
        rid,
        kw.get("return_logprob", False),
        kw.get("top_logprobs_num", 0),
        encode=lambda text: [ord(c) % 100 for c in text],
        model_info=INFO,
        in_use=lambda r: r in in_use,
    )


def test_one_group_per_prompt_with_its_n_rids() -> None:
    call = _prepare(
        prompt=["ab", "cde"], sampling_params={"n": 3, "seed": 4}, rid=[f"r{i}" for i in range(6)]
    )
    assert [g.rids for g in call.groups] == [["r0", "r1", "r2"], ["r3", "r4", "r5"]]
    assert [g.index for g in call.groups] == [0, 1]
    assert [len(g.input_ids) for g in call.groups] == [2, 3]
    assert all(g.params.n == 3 and g.params.seed == 4 for g in call.groups)  # seed + k is the core's job
    assert call.rids == [f"r{i}" for i in range(6)] and not call.single


def test_single_means_one_plain_prompt_and_one_sample() -> None:
    assert _prepare(prompt="ab").single
    assert _prepare(input_ids=[1, 2]).single
    assert not _prepare(input_ids=[[1, 2]]).single
    assert not _prepare(prompt="ab", sampling_params=SamplingParams(n=2)).single
    fresh = _prepare(prompt=["a", "b"], sampling_params=[{"n": 2}, {"n": 1}])
    assert [len(g.rids) for g in fresh.groups] == [2, 1] and len(set(fresh.rids)) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_ids": []}, "no prompts|empty"),
        ({"input_ids": [[]]}, "empty"),
        ({"input_ids": [1, 100]}, r"100.*outside the vocabulary \[0, 100\)"),
        ({"input_ids": [1, True]}, "outside the vocabulary"),
        ({"input_ids": [1] * 50}, "50 tokens; the context length is 50"),
        ({"input_ids": [1] * 30}, r"30 tokens, but the KV cache holds 30 tokens.*\(31\)"),
        ({"prompt": "x", "input_ids": [1]}, "exactly one of prompt or input_ids"),
        ({"prompt": ["a"], "sampling_params": [{}, {}]}, "2 entries for 1 prompts"),
        ({"prompt": "a", "rid": ["x", "y"]}, "list of 1"),
        ({"prompt": ["a", "b"], "rid": ["x", "x"]}, "same id more than once"),
        ({"prompt": "a", "rid": "busy", "in_use": {"busy"}}, "already in use"),
        ({"prompt": "a", "top_logprobs_num": 21}, "top_logprobs_num"),
        ({"prompt": "a", "sampling_params": {"temperature": -1}}, "temperature"),
    ],
)
def test_every_bad_input_is_a_value_error_naming_it(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _prepare(**kwargs)


def test_the_largest_prompt_the_pool_holds_passes() -> None:
    assert len(_prepare(input_ids=[1] * 29).groups[0].input_ids) == 29
