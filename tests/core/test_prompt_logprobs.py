"""Prompt logprobs (SGLang's logprob_start_len / input_token_logprobs) and max_new_tokens=0, in the core.

The oracle is transformers' own forward in float32: the logprob of prompt token j is log_softmax of HF's
logits at position j - 1, gathered at token j. Every way the core can split or skip the prompt (chunked
prefill, a prefix-cache hit, retraction, n > 1 samples) must report exactly those values, each position
once.
"""

from __future__ import annotations

import pytest
import torch

from radixlm import Engine
from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.core.scheduler import Scheduler
from radixlm.messages import AddRequest, RequestOutput
from radixlm.testing import cached_model_folder
from tests.parity_utils import _hf_model, random_prompts

ATOL = 2e-4
GREEDY = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}


def _core(impl: str = "native", **options) -> EngineCore:
    path = cached_model_folder("qwen2", "tiny")
    cfg = EngineConfig(model_path=str(path), model_impl=impl, dtype="float32", inline_core=True, **options)
    return EngineCore(cfg)


def hf_prompt_logprobs(prompt: list[int], top: int = 0) -> tuple[list[float], list[list[float]]]:
    """transformers' logprob of prompt token j given tokens < j, for j = 1..L-1 (and the top values)."""
    model = _hf_model(str(cached_model_folder("qwen2", "tiny")), torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)[:-1]
    target = torch.tensor(prompt[1:])
    values = lp.gather(1, target[:, None]).squeeze(1).tolist()
    tops = lp.topk(top, dim=-1).values.tolist() if top else []
    return values, tops


def drive(core: EngineCore, requests: list[AddRequest], stagger: int = 0) -> dict[str, list[RequestOutput]]:
    """Add the requests (one every `stagger` steps, or all at once), step to the end, check the KV
    accounting after each step; every output per rid."""
    outs: dict[str, list[RequestOutput]] = {}
    pending = list(requests)
    step = 0
    while pending or core.has_work():
        if pending and (stagger == 0 or step % stagger == 0):
            take = pending if stagger == 0 else pending[:1]
            for r in take:
                core.add_request(r)
            pending = pending[len(take) :]
        for o in core.step():
            assert o.finish_reason is None or not o.finish_reason.is_abort, o.finish_reason
            outs.setdefault(o.rid, []).append(o)
        core.check()
        step += 1
    return outs


def prompt_lps(outs: list[RequestOutput]) -> list[float]:
    return [v for o in outs for v in o.new_input_logprobs]


def assert_matches(ours: list[float], prompt: list[int], k: int, label: str) -> None:
    ref, _ = hf_prompt_logprobs(prompt)
    want = ref[max(k, 1) - 1 :]  # the core reports positions max(k, 1)..L-1 (position 0 has none)
    assert len(ours) == len(want), f"{label}: {len(ours)} values for {len(want)} positions"
    diff = max((abs(a - b) for a, b in zip(ours, want)), default=0.0)
    assert diff < ATOL, f"{label}: max |diff| {diff}"


def request(rid: str, prompt: list[int], k: int, params=GREEDY, top: int = 0, rids=None) -> AddRequest:
    return AddRequest(
        rids or [rid], prompt, dict(params), return_logprob=True, top_logprobs_num=top, logprob_start_len=k
    )


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_start_at_zero_and_in_the_middle(impl: str) -> None:
    core = _core(impl, max_total_tokens=4096)
    prompts = random_prompts(core.runner.vocab_size, [2, 9, 40, 77], seed=11)
    reqs = [request(f"a{i}", p, 0) for i, p in enumerate(prompts)]
    reqs += [request(f"m{i}", p, len(p) // 2) for i, p in enumerate(prompts)]
    outs = drive(core, reqs)
    for i, p in enumerate(prompts):
        assert_matches(prompt_lps(outs[f"a{i}"]), p, 0, f"{impl} k=0 len {len(p)}")
        assert_matches(prompt_lps(outs[f"m{i}"]), p, len(p) // 2, f"{impl} k=L/2 len {len(p)}")
        assert sum(len(o.new_token_ids) for o in outs[f"a{i}"]) == GREEDY["max_new_tokens"]


def test_top_logprobs_of_prompt_tokens() -> None:
    core = _core(max_total_tokens=4096)
    (p,) = random_prompts(core.runner.vocab_size, [30], seed=12)
    outs = drive(core, [request("t", p, 3, top=4)])["t"]
    tops = [row for o in outs for row in o.new_input_top_logprobs]
    _, ref_tops = hf_prompt_logprobs(p, top=4)
    want = ref_tops[2:]
    assert len(tops) == len(want) == len(p) - 3
    for row, ref in zip(tops, want):
        assert len(row) == 4
        assert max(abs(lp - r) for (_, lp), r in zip(row, ref)) < ATOL


def test_chunked_prefill() -> None:
    core = _core(max_total_tokens=4096, chunked_prefill_size=16)
    prompts = random_prompts(core.runner.vocab_size, [77, 50, 17], seed=13)
    ks = [0, 30, 16]
    outs = drive(core, [request(f"c{i}", p, k) for i, (p, k) in enumerate(zip(prompts, ks))], stagger=1)
    for i, (p, k) in enumerate(zip(prompts, ks)):
        assert_matches(prompt_lps(outs[f"c{i}"]), p, k, f"chunked len {len(p)} k={k}")


def test_prefix_cache_already_holds_the_prompt() -> None:
    core = _core(max_total_tokens=4096)
    (p,) = random_prompts(core.runner.vocab_size, [60], seed=14)
    drive(core, [AddRequest(["warm"], p, dict(GREEDY))])  # the prompt is now in the radix cache
    outs = drive(core, [request("all", p, 0)])["all"]
    assert_matches(prompt_lps(outs), p, 0, "cached k=0")
    # Positions before the start need no logits: the cache still serves them.
    outs = drive(core, [request("mid", p, 40)])["mid"]
    assert_matches(prompt_lps(outs), p, 40, "cached k=40")
    assert outs[-1].cached_tokens >= 30


def test_retraction_scores_each_position_once(monkeypatch) -> None:
    # A pool too small for all three: the newest is retracted in the middle of its prompt, with prompt
    # positions still to score, and resumes later (its KV partly from the prefix cache).
    retracted: list[tuple[str, bool]] = []
    original = Scheduler._retract

    def spy(self: Scheduler, req) -> None:
        retracted.append((req.rid, req.scores_prompt))
        original(self, req)

    monkeypatch.setattr(Scheduler, "_retract", spy)
    core = _core(max_total_tokens=300, chunked_prefill_size=16)
    prompts = random_prompts(core.runner.vocab_size, [100, 100, 150], seed=15)
    params = {**GREEDY, "max_new_tokens": 45}
    ks = [0, 50, 3]
    reqs = [request(f"r{i}", p, k, params) for i, (p, k) in enumerate(zip(prompts, ks))]
    outs = drive(core, reqs, stagger=7)
    assert any(mid_prompt for _, mid_prompt in retracted), f"no retraction mid-prompt: {retracted}"
    for i, (p, k) in enumerate(zip(prompts, ks)):
        assert_matches(prompt_lps(outs[f"r{i}"]), p, k, f"retraction len {len(p)} k={k}")


@pytest.mark.parametrize("disable_radix_cache", [False, True])
def test_every_sample_of_n_gets_the_prompt_logprobs(disable_radix_cache: bool) -> None:
    core = _core(max_total_tokens=4096, disable_radix_cache=disable_radix_cache)
    (p,) = random_prompts(core.runner.vocab_size, [45], seed=16)
    outs = drive(core, [request("", p, 2, rids=["s0", "s1", "s2"])])
    for rid in ("s0", "s1", "s2"):
        assert_matches(prompt_lps(outs[rid]), p, 2, f"sample {rid}")


def test_no_prompt_logprobs_by_default() -> None:
    core = _core(max_total_tokens=4096)
    (p,) = random_prompts(core.runner.vocab_size, [20], seed=17)
    outs = drive(core, [AddRequest(["d"], p, dict(GREEDY), return_logprob=True)])["d"]
    assert prompt_lps(outs) == []
    assert [len(o.new_logprobs) for o in outs] == [1] * GREEDY["max_new_tokens"]


# ---- max_new_tokens = 0 ---------------------------------------------------------------------------
def test_max_new_tokens_zero_computes_and_caches_the_prompt() -> None:
    core = _core(max_total_tokens=4096, chunked_prefill_size=16)
    (p,) = random_prompts(core.runner.vocab_size, [40], seed=18)
    outs = drive(core, [request("z", p, 0, {"max_new_tokens": 0})])["z"]
    assert [t for o in outs for t in o.new_token_ids] == []
    assert outs[-1].finish_reason is not None and outs[-1].finish_reason.to_dict() == {
        "type": "length",
        "length": 0,
    }
    assert outs[-1].completion_tokens == 0
    assert_matches(prompt_lps(outs), p, 0, "max_new_tokens=0")
    again = drive(core, [AddRequest(["again"], p, dict(GREEDY))])["again"]
    assert again[-1].cached_tokens == len(p) - 1  # the prompt went to the prefix cache


def test_engine_max_new_tokens_zero_and_input_token_logprobs() -> None:
    path = cached_model_folder("qwen2", "tiny")
    with Engine(model_path=str(path), dtype="float32", max_total_tokens=4096) as llm:
        out = llm.generate(input_ids=[1, 2, 3, 4], sampling_params={"max_new_tokens": 0})
        assert out["output_ids"] == [] and out["text"] == ""
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
        assert out["meta_info"]["completion_tokens"] == 0

        prompt = [5, 17, 33, 2, 90, 41]
        res = llm.generate(
            input_ids=[prompt, prompt],
            sampling_params={"max_new_tokens": 2, "temperature": 0},
            return_logprob=True,
            top_logprobs_num=2,
            logprob_start_len=0,
        )
        ref, _ = hf_prompt_logprobs(prompt)
        for i, r in enumerate(res):
            entries = r["meta_info"]["input_token_logprobs"]
            assert [e[1] for e in entries] == prompt
            assert entries[0][0] is None
            diffs = [abs(e[0] - v) for e, v in zip(entries[1:], ref)]
            # Seen once in CI (2026-12-02, not reproduced on this CPU in 80 runs): 5.1e-4 against a float32
            # noise of ~4e-6 here; the message says which request, which positions, and what it reused.
            assert max(diffs) < ATOL, (
                f"request {i}: |ours - transformers| per prompt position {diffs}, "
                f"cached_tokens {r['meta_info'].get('cached_tokens')}, ours {[e[0] for e in entries[1:]]}, "
                f"transformers {ref}"
            )
            tops = r["meta_info"]["input_top_logprobs"]
            assert tops[0] is None and all(len(row) == 2 for row in tops[1:])
            assert len(r["meta_info"]["output_token_logprobs"]) == 2
        mid = llm.generate(
            input_ids=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=4
        )
        entries = mid["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in entries] == prompt[4:]
        assert max(abs(e[0] - v) for e, v in zip(entries, ref[3:])) < ATOL
        assert mid["meta_info"]["output_token_logprobs"] == []
        for bad in (-2, 6, 1.5, True):
            with pytest.raises(ValueError, match="logprob_start_len"):
                llm.generate(input_ids=prompt, return_logprob=True, logprob_start_len=bad)


# ---- tensor parallelism: the other ranks get the scored rows through the wire form ----------------------
def test_step_wire_form_carries_scored_rows_and_logit_bias() -> None:
    import msgpack

    from radixlm.model.step_input import SamplingInput, SpanInput, StepInput, step_from_wire, step_to_wire
    from radixlm.sampling_params import SamplingParams

    step = StepInput(
        [SpanInput(3, 10, [1, 2, 3], [40, 41, 42], True, 1, [3, 9], 2), SpanInput(1, 0, [5], [7], False)],
        [(3, 10, [40, 41, 42])],
        [SamplingInput(SamplingParams(temperature=0, logit_bias={7: -100.0, 12: 3.5}), 5, 0)],
    )
    back = step_from_wire(msgpack.unpackb(msgpack.packb(step_to_wire(step)), raw=False))
    assert back.spans == step.spans and back.table_writes == step.table_writes
    assert back.sampling[0].params == step.sampling[0].params


def test_tensor_parallel_prompt_logprobs() -> None:
    core = _core(tp_size=2, max_total_tokens=4096, chunked_prefill_size=16)
    try:
        prompts = random_prompts(core.runner.vocab_size, [40, 9], seed=19)
        params = {**GREEDY, "logit_bias": {17: 100}}
        outs = drive(core, [request(f"p{i}", p, i * 3, params, top=2) for i, p in enumerate(prompts)])
        for i, p in enumerate(prompts):
            assert_matches(prompt_lps(outs[f"p{i}"]), p, i * 3, f"tp2 len {len(p)}")
            assert [t for o in outs[f"p{i}"] for t in o.new_token_ids] == [17] * GREEDY["max_new_tokens"]
    finally:
        core.close()
