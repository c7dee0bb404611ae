import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radixlm.sampling_params import SamplingParams

FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]


def test_defaults():
    p = SamplingParams()
    assert p.max_new_tokens == 128
    assert p.min_new_tokens == 0
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == -1
    assert p.min_p == 0.0
    assert p.repetition_penalty == 1.0
    assert p.frequency_penalty == 0.0
    assert p.presence_penalty == 0.0
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.n == 1
    assert p.seed is None
    assert p.skip_special_tokens is True
    assert p.spaces_between_special_tokens is True
    assert p.no_stop_trim is False
    assert not p.is_greedy
    # Mutable defaults are not shared between instances.
    assert SamplingParams().stop is not p.stop


BAD_VALUES = [
    ("max_new_tokens", -1),
    ("max_new_tokens", True),
    ("max_new_tokens", 1.5),
    ("max_new_tokens", "10"),
    ("max_new_tokens", None),
    ("min_new_tokens", -1),
    ("min_new_tokens", 129),  # more than max_new_tokens
    ("min_new_tokens", False),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", "0.5"),
    ("temperature", True),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.5),
    ("top_p", float("nan")),
    ("top_p", None),
    ("top_k", -2),
    ("top_k", 2.0),
    ("top_k", True),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("min_p", "x"),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", float("inf")),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", -2.01),
    ("frequency_penalty", float("nan")),
    ("presence_penalty", 3),
    ("presence_penalty", -3.0),
    ("stop", 5),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop", None),
    ("stop_token_ids", 5),
    ("stop_token_ids", [1, -1]),
    ("stop_token_ids", [1, "2"]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", "12"),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("n", 0),
    ("n", True),
    ("n", 1.0),
    ("seed", 1.5),
    ("seed", "7"),
    ("seed", True),
    ("seed", 2**80),  # beyond 64 bits: msgpack could not carry it to the core
    ("seed", -(2**80)),
    ("max_new_tokens", 2**64),
    ("top_k", 2**63),
    ("stop_token_ids", [2**64]),
    ("stop", ["\ud800"]),  # a lone surrogate: not encodable text
    ("skip_special_tokens", None),
    ("spaces_between_special_tokens", 0),
    ("no_stop_trim", "false"),
    ("logit_bias", {5: 100.5}),  # OpenAI's range is [-100, 100]
    ("logit_bias", {5: -101}),
    ("logit_bias", {5: float("nan")}),
    ("logit_bias", {5: "1"}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"abc": 1.0}),
    ("logit_bias", {"-3": 1.0}),
    ("logit_bias", {True: 1.0}),
    ("logit_bias", [[5, 1.0]]),
    ("json_schema", "{not json"),
    ("json_schema", "[1, 2]"),  # valid JSON, but not a schema object
    ("json_schema", 5),
    ("regex", ""),
    ("regex", 3),
    ("ebnf", ["root ::= x"]),
    ("structural_tag", "true"),
    ("structural_tag", "\ud800"),
]


def test_bad_values_cover_every_field():
    assert {name for name, _ in BAD_VALUES} == set(FIELDS)


@pytest.mark.parametrize("name,value", BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_bad_value_raises_value_error_naming_field(name, value):
    with pytest.raises(ValueError, match=rf"sampling_params\.{name}\b"):
        SamplingParams(**{name: value})
    with pytest.raises(ValueError, match=rf"sampling_params\.{name}\b"):
        SamplingParams.from_any({name: value})


def test_message_says_what_was_expected():
    with pytest.raises(ValueError) as e:
        SamplingParams(top_p=1.5)
    assert str(e.value) == "sampling_params.top_p must be in (0, 1], got 1.5"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"min_new_tokens": 128},
        {"temperature": 0},
        {"temperature": 100.0},
        {"top_p": 1},
        {"top_p": 1e-9},
        {"top_k": 1},
        {"top_k": 10**9},
        {"min_p": 0},
        {"min_p": 1},
        {"repetition_penalty": 1e-3},
        {"frequency_penalty": -2},
        {"presence_penalty": 2},
        {"seed": -(2**63)},  # every 64-bit int: what msgpack carries to the core
        {"seed": 2**63 - 1},
        {"n": 4},
        {"logit_bias": {0: -100, 7: 100.0}},
    ],
)
def test_edge_values_accepted(kwargs):
    SamplingParams(**kwargs)


def test_logit_bias_keys_may_be_decimal_strings():
    # JSON object keys are strings: OpenAI's {"50256": -100} means token 50256.
    assert SamplingParams.from_any({"logit_bias": {"50256": -100, 3: 2}}).logit_bias == {
        50256: -100.0,
        3: 2.0,
    }


def test_int_floats_become_floats():
    p = SamplingParams(temperature=1, top_p=1, min_p=0, repetition_penalty=2, frequency_penalty=1)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty"):
        assert type(getattr(p, name)) is float


def test_top_k_zero_means_disabled():
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(top_k=-1).top_k == -1
    assert SamplingParams(top_k=5).top_k == 5


def test_stop_normalization():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert type(SamplingParams(stop_token_ids=(3,)).stop_token_ids) is list


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy


def test_from_any():
    assert SamplingParams.from_any(None) == SamplingParams()
    p = SamplingParams(temperature=0.5)
    assert SamplingParams.from_any(p) is p
    q = SamplingParams.from_any({"temperature": 0.5, "stop": "x"})
    assert q.temperature == 0.5 and q.stop == ["x"]


def test_from_any_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ValueError) as e:
        SamplingParams.from_any({"temperature": 0.5, "max_tokens": 10})
    msg = str(e.value)
    assert "'max_tokens'" in msg
    for name in FIELDS:
        assert name in msg


@pytest.mark.parametrize("obj", [[("temperature", 1.0)], "temperature=1", 3])
def test_from_any_rejects_non_mappings(obj):
    with pytest.raises(ValueError, match="sampling_params"):
        SamplingParams.from_any(obj)


def test_to_dict_round_trip_and_copies():
    p = SamplingParams(stop=["a"], stop_token_ids=[1], seed=3, top_k=0)
    d = p.to_dict()
    assert set(d) == set(FIELDS)
    assert d["top_k"] == -1
    assert SamplingParams.from_any(d) == p
    d["stop"].append("b")
    assert p.stop == ["a"]


valid_params = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.integers(0, 4096),
        "temperature": st.floats(0, 10),
        "top_p": st.floats(0, 1, exclude_min=True),
        "top_k": st.integers(-1, 1000),
        "min_p": st.floats(0, 1),
        "repetition_penalty": st.floats(0.01, 10),
        "frequency_penalty": st.floats(-2, 2),
        "presence_penalty": st.floats(-2, 2),
        "stop": st.one_of(st.text(min_size=1), st.lists(st.text(min_size=1), max_size=3)),
        "stop_token_ids": st.lists(st.integers(0, 10**6), max_size=3),
        "ignore_eos": st.booleans(),
        "n": st.integers(1, 8),
        "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    },
)


@given(valid_params)
def test_valid_dicts_round_trip(d):
    p = SamplingParams.from_any(d)
    assert SamplingParams.from_any(p.to_dict()) == p
