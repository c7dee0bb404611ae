"""The offline Engine API, exactly as DESIGN.md states it."""

from __future__ import annotations

import asyncio

import pytest

from radixlm import Engine, SamplingParams
from radixlm.testing import cached_model_folder


@pytest.fixture(scope="module")
def llm():
    with Engine(
        model_path=str(cached_model_folder("qwen2")), dtype="float32", max_total_tokens=8192
    ) as engine:
        yield engine


GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


def test_positional_list_in_list_out(llm) -> None:
    outs = llm.generate(["The capital of France is", "Hello"], {"max_new_tokens": 5})
    assert isinstance(outs, list) and len(outs) == 2
    for o in outs:
        assert set(o) >= {"text", "output_ids", "meta_info"}
        meta = o["meta_info"]
        assert set(meta) >= {
            "id",
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "finish_reason",
            "e2e_latency",
        }
        assert meta["completion_tokens"] == len(o["output_ids"]) <= 5
        assert meta["finish_reason"]["type"] in ("stop", "length")


def test_single_prompt_returns_a_dict_with_length_reason(llm) -> None:
    out = llm.generate(prompt="Hi there", sampling_params=GREEDY)
    assert isinstance(out, dict)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert len(out["output_ids"]) == 12
    assert out["text"] == llm.tokenizer_manager.decode(out["output_ids"])


def test_input_ids_and_sampling_params_class(llm) -> None:
    ids = llm.tokenizer_manager.encode("Hi there")
    a = llm.generate(input_ids=ids, sampling_params=SamplingParams(**GREEDY))
    b = llm.generate(prompt="Hi there", sampling_params=GREEDY)
    assert a["output_ids"] == b["output_ids"]
    batch = llm.generate(input_ids=[ids, ids[:2]], sampling_params=[GREEDY, {**GREEDY, "max_new_tokens": 3}])
    assert [len(o["output_ids"]) for o in batch] == [12, 3]


def test_stream_yields_deltas_that_add_up(llm) -> None:
    full = llm.generate(prompt="Once upon a time", sampling_params=GREEDY)
    chunks = list(llm.generate(prompt="Once upon a time", sampling_params=GREEDY, stream=True))
    assert len(chunks) >= 2
    assert sum((c["output_ids"] for c in chunks), []) == full["output_ids"]
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_async_generate_and_async_stream(llm) -> None:
    async def main():
        one = await llm.async_generate(prompt="Hello", sampling_params=GREEDY)
        gen = await llm.async_generate(prompt="Hello", sampling_params=GREEDY, stream=True)
        ids = [t async for c in gen for t in c["output_ids"]]
        return one, ids

    one, ids = asyncio.run(main())
    assert ids == one["output_ids"]


def test_stop_string_is_trimmed_and_reported(llm) -> None:
    base = llm.generate(prompt="The weather", sampling_params={**GREEDY, "max_new_tokens": 16})
    text = base["text"]
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate(prompt="The weather", sampling_params={**GREEDY, "max_new_tokens": 16, "stop": stop})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stop not in out["text"] and text.startswith(out["text"])
    kept = llm.generate(
        prompt="The weather",
        sampling_params={**GREEDY, "max_new_tokens": 16, "stop": stop, "no_stop_trim": True},
    )
    assert stop in kept["text"]


def test_stop_token_ids(llm) -> None:
    base = llm.generate(prompt="Tell me", sampling_params=GREEDY)
    tok = base["output_ids"][4]
    out = llm.generate(prompt="Tell me", sampling_params={**GREEDY, "stop_token_ids": [tok]})
    assert out["output_ids"][-1] == tok and out["meta_info"]["finish_reason"] == {
        "type": "stop",
        "matched": tok,
    }


def test_n_returns_n_results_and_seeds_reproduce(llm) -> None:
    params = {"max_new_tokens": 8, "temperature": 1.0, "n": 3, "seed": 7, "ignore_eos": True}
    a = llm.generate(prompt="Pick a word", sampling_params=params)
    b = llm.generate(prompt="Pick a word", sampling_params=params)
    assert isinstance(a, list) and len(a) == 3
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
    assert len({tuple(o["output_ids"]) for o in a}) > 1


def test_seeded_output_is_the_same_whatever_else_is_in_the_batch(llm) -> None:
    p = {"max_new_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 123, "ignore_eos": True}
    alone = llm.generate(prompt="A seeded prompt", sampling_params=p)
    crowd = llm.generate(
        ["other one", "A seeded prompt", "a third, longer prompt here"],
        [{**p, "seed": 1}, p, {**p, "seed": 2}],
    )
    assert crowd[1]["output_ids"] == alone["output_ids"]


def test_logprobs(llm) -> None:
    out = llm.generate(prompt="Hello", sampling_params=GREEDY, return_logprob=True, top_logprobs_num=3)
    lps = out["meta_info"]["output_token_logprobs"]
    tops = out["meta_info"]["output_top_logprobs"]
    assert len(lps) == len(tops) == 12
    for (lp, tid, _), top in zip(lps, tops):
        assert top[0][1] == tid and abs(top[0][0] - lp) < 1e-5  # greedy picks the top token
        assert top[0][0] >= top[1][0] >= top[2][0]


def test_bad_input_names_the_field_and_engine_survives(llm) -> None:
    with pytest.raises(ValueError, match="temperature"):
        llm.generate(prompt="x", sampling_params={"temperature": -1})
    with pytest.raises(ValueError, match="max_new_tokenz"):
        llm.generate(prompt="x", sampling_params={"max_new_tokenz": 3})
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate(input_ids=[1, 10**7])
    with pytest.raises(ValueError, match="context length"):
        llm.generate(input_ids=[5] * 10_000)
    with pytest.raises(ValueError, match="top_logprobs_num"):
        llm.generate(prompt="x", return_logprob=True, top_logprobs_num=-1)
    assert (
        llm.generate(prompt="still alive", sampling_params={"max_new_tokens": 2})["meta_info"][
            "completion_tokens"
        ]
        >= 1
    )


def test_unknown_engine_option_is_a_type_error_listing_valid_ones() -> None:
    with pytest.raises(TypeError, match="max_total_tokenz.*max_total_tokens"):
        Engine(model_path=str(cached_model_folder("qwen2")), max_total_tokenz=5)


def test_model_info_and_flush_cache(llm) -> None:
    info = llm.get_model_info()
    assert info["model_impl"] == "native" and "native" in info["model_impl_reason"]
    assert llm.flush_cache()["success"] is True
    server = llm.get_server_info()
    assert server["cache_size"] == 0 and server["kv_used"] == 0


def test_generate_after_shutdown_fails_fast() -> None:
    engine = Engine(
        model_path=str(cached_model_folder("qwen2")), dtype="float32", max_total_tokens=1024, inline_core=True
    )
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(prompt="x")
    engine.shutdown()  # idempotent
