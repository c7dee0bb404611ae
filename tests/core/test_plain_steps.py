"""The plain-step fast paths (Request.mark_plain -> StepInput.text_only / plain_greedy) change nothing but
cost: the same workload with every request marked non-plain (so every step takes the general path) gives
the same outputs, field for field; the flags are set exactly while no running request needs the checks,
and they survive the wire to the other tensor-parallel ranks."""

from __future__ import annotations

import random

import pytest

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.core.request import Request
from radixlm.messages import AddRequest
from radixlm.model.step_input import step_from_wire, step_to_wire
from radixlm.testing import cached_model_folder

GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}


def _run(monkeypatch: pytest.MonkeyPatch, general: bool, extra: list[tuple[str, dict]]) -> tuple[list, list]:
    """Every output and every StepInput of one workload (prompts of several lengths, chunked prefill)."""
    if general:  # nothing is plain: the step inputs, sampling and outputs take the general code
        monkeypatch.setattr(Request, "mark_plain", lambda self: None)
    core = EngineCore(
        EngineConfig(
            model_path=str(cached_model_folder("llama")),
            dtype="float32",
            device="cpu",
            max_total_tokens=600,
            chunked_prefill_size=16,
            max_running_requests=8,
            random_seed=0,
        )
    )
    steps = []
    forward = core.runner.forward
    core.runner.forward = lambda step: steps.append(step) or forward(step)
    rng = random.Random(1)
    for i, n in enumerate([5, 23, 40, 9]):
        core.add_request(AddRequest([f"p{i}"], [rng.randrange(3, 500) for _ in range(n)], GREEDY))
    outputs = []
    while core.has_work():
        outputs += core.step()
        core.check()
        if len(steps) == 3:  # a request that needs the general path joins the running batch, then leaves
            for rid, params in extra:
                core.add_request(AddRequest([rid], [rng.randrange(3, 500) for _ in range(7)], params))
    monkeypatch.undo()
    return outputs, steps


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [("pen", {**GREEDY, "max_new_tokens": 3, "frequency_penalty": 0.5})],
        [("sampled", {**GREEDY, "max_new_tokens": 3, "temperature": 0.7, "seed": 3})],
    ],
    ids=["plain", "penalty", "sampled"],
)
def test_fast_paths_give_the_general_paths_outputs(monkeypatch: pytest.MonkeyPatch, extra: list) -> None:
    fast, fast_steps = _run(monkeypatch, general=False, extra=extra)
    general, general_steps = _run(monkeypatch, general=True, extra=extra)
    assert fast == general
    assert len(fast_steps) == len(general_steps)
    assert not any(s.text_only or s.plain_greedy for s in general_steps)
    assert all(s.text_only for s in fast_steps)  # no images, M-RoPE, pooling or prompt logprobs here
    # plain_greedy exactly while no running request samples otherwise: off while `extra` runs, then on
    greedy = [s.plain_greedy for s in fast_steps]
    if not extra:
        assert all(greedy)
    else:
        assert greedy[:3] == [True] * 3 and not all(greedy) and greedy[-1]


def test_prompt_logprobs_turn_text_only_off() -> None:
    core = EngineCore(
        EngineConfig(model_path=str(cached_model_folder("llama")), dtype="float32", device="cpu",
                     max_total_tokens=300, random_seed=0)
    )  # fmt: skip
    steps = []
    forward = core.runner.forward
    core.runner.forward = lambda step: steps.append(step) or forward(step)
    core.add_request(AddRequest(["a"], list(range(5, 20)), GREEDY, return_logprob=True, logprob_start_len=2))
    while core.has_work():
        core.step()
    assert steps and not any(s.text_only or s.plain_greedy for s in steps)
    assert steps[0].scores_prompt


def test_step_flags_survive_the_wire() -> None:
    from radixlm.model.step_input import SpanInput, StepInput

    for text_only, plain_greedy in [(True, True), (True, False), (False, True), (False, False)]:
        step = StepInput([SpanInput(0, 3, [7], [9], True)], text_only=text_only, plain_greedy=plain_greedy)
        back = step_from_wire(step_to_wire(step))
        assert (back.text_only, back.plain_greedy) == (text_only, plain_greedy)
