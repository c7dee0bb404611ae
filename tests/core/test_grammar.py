"""Constrained decoding through the Engine on random weights: the grammar must hold when the model is noise.

Issue 13's validity bar: 50 generations for each of 10 JSON schemas valid under jsonschema, regex outputs
that full-match, an EBNF arithmetic grammar whose outputs parse, and every finish a grammar end (a stop),
never a cut at max_new_tokens. Plus the interplay: n > 1, streaming, seeds, stop strings, the prefix cache,
min_new_tokens, ignore_eos, a grammar that does not compile, and the mask in the sampler itself.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from radixlm import Engine
from radixlm.messages import AddRequest
from radixlm.model.sampler import Sampler, SamplingBatch, allowed_tokens, apply_token_bitmask
from radixlm.sampling_params import SamplingParams
from radixlm.testing import cached_model_folder
from tests.core.grammar_schemas import SCHEMAS

PROMPTS = ["Give me JSON:", "Here is the answer", "x", "Once upon a time", "{"]


@pytest.fixture(scope="module")
def llm():
    with Engine(model_path=str(cached_model_folder("qwen2")), dtype="float32", max_total_tokens=16384) as e:
        yield e


def _stopped(out: dict) -> bool:
    return out["meta_info"]["finish_reason"]["type"] == "stop"


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_fifty_generations_per_schema_are_valid(llm, name: str) -> None:
    schema = SCHEMAS[name]
    # 5 prompts x n=10 = 50 samples, sampled at temperature 1 (distinct seeds per sample of a prompt)
    outs = llm.generate(PROMPTS, {"max_new_tokens": 300, "json_schema": schema, "temperature": 1.0, "n": 10})
    assert len(outs) == 50
    for o in outs:
        assert _stopped(o), o
        jsonschema.validate(json.loads(o["text"]), schema)
    assert len({o["text"] for o in outs}) > 1, "fifty identical outputs: the samples are not sampled"


def test_regex_outputs_full_match(llm) -> None:
    pattern = r"(cat|dog|bird)-[0-9]{2,4}(\.[a-z]{1,3})?"
    outs = llm.generate(PROMPTS, {"max_new_tokens": 40, "regex": pattern, "temperature": 1.0, "n": 10})
    assert all(_stopped(o) and re.fullmatch(pattern, o["text"]) for o in outs), [o["text"] for o in outs]


ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= number | "(" expr ")"
number ::= [1-9] [0-9]{0,2}
"""


def _parse_arithmetic(text: str) -> bool:
    """A recursive-descent parser of the same language, independent of the grammar engine."""
    pos = 0

    def number() -> bool:
        nonlocal pos
        m = re.match(r"[1-9][0-9]{0,2}", text[pos:])
        if not m:
            return False
        pos += m.end()
        return True

    def factor() -> bool:
        nonlocal pos
        if text[pos : pos + 1] == "(":
            pos += 1
            if not expr() or text[pos : pos + 1] != ")":
                return False
            pos += 1
            return True
        return number()

    def chain(item, ops: str) -> bool:
        nonlocal pos
        if not item():
            return False
        while text[pos : pos + 1] and text[pos] in ops:
            pos += 1
            if not item():
                return False
        return True

    def term() -> bool:
        return chain(factor, "*/")

    def expr() -> bool:
        return chain(term, "+-")

    return expr() and pos == len(text)


def test_ebnf_arithmetic_outputs_parse(llm) -> None:
    outs = llm.generate(PROMPTS, {"max_new_tokens": 200, "ebnf": ARITHMETIC, "temperature": 1.0, "n": 10})
    assert all(_stopped(o) and _parse_arithmetic(o["text"]) for o in outs), [o["text"] for o in outs]
    assert _parse_arithmetic("(1+2)*3") and not _parse_arithmetic("1+") and not _parse_arithmetic("01")


def test_seeded_grammar_samples_repeat_and_greedy_works(llm) -> None:
    params = {"max_new_tokens": 60, "json_schema": SCHEMAS["bounded-numbers"], "seed": 11, "n": 3}
    first = [o["text"] for o in llm.generate("seeded", params)]
    again = [o["text"] for o in llm.generate("seeded", params)]  # a prefix-cache hit this time
    assert first == again
    greedy = llm.generate("g", {"max_new_tokens": 60, "regex": "[a-z]{3,6}", "temperature": 0})
    assert re.fullmatch("[a-z]{3,6}", greedy["text"])


def test_streaming_concatenates_to_a_valid_document(llm) -> None:
    schema = SCHEMAS["nested-object"]
    chunks = list(llm.generate(prompt="stream", sampling_params={"max_new_tokens": 120, "json_schema": schema},
                               stream=True))
    text = "".join(c["text"] for c in chunks)
    jsonschema.validate(json.loads(text), schema)
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "stop"


def test_a_stop_string_still_ends_a_constrained_request(llm) -> None:
    out = llm.generate("s", {"max_new_tokens": 60, "regex": "ab(cd)+", "stop": ["cd"], "temperature": 0})
    assert out["text"] == "ab" and out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "cd"}


def test_the_grammar_ends_a_request_even_with_ignore_eos_and_min_tokens(llm) -> None:
    out = llm.generate("e", {"max_new_tokens": 50, "regex": "yes|no", "ignore_eos": True, "min_new_tokens": 5})
    assert out["text"] in ("yes", "no") and _stopped(out)


def test_a_grammar_that_does_not_compile_is_a_value_error_naming_the_field(llm) -> None:
    with pytest.raises(ValueError, match=r"sampling_params\.regex does not compile.*parenthesis"):
        llm.generate("x", {"regex": "(a"})
    with pytest.raises(ValueError, match=r"sampling_params\.json_schema"):
        llm.generate("x", {"json_schema": {"type": "no-such-type"}})
    with pytest.raises(ValueError, match=r"sampling_params\.ebnf"):
        llm.generate("x", {"ebnf": "root ::= undefined_rule"})
    # the engine still serves
    assert llm.generate("x", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] <= 2


def test_the_core_refuses_a_bad_grammar_that_skipped_the_front(tmp_path) -> None:
    from radixlm.config import EngineConfig
    from radixlm.core.engine_core import EngineCore

    core = EngineCore(EngineConfig(model_path=str(cached_model_folder("qwen2")), max_total_tokens=2048))
    try:
        bad = SamplingParams(regex="(a").to_dict()
        good = SamplingParams(regex="ok", max_new_tokens=5).to_dict()
        core.add_request(AddRequest(["bad"], [5, 6, 7], bad))
        core.add_request(AddRequest(["good"], [5, 6, 7], good))
        outs = {}
        for _ in range(200):
            for o in core.step():
                outs.setdefault(o.rid, []).append(o)
            if not core.has_work():
                break
        (refusal,) = outs["bad"]
        assert refusal.finish_reason.abort_kind == "refused" and "sampling_params.regex" in refusal.finish_reason.message
        assert outs["good"][-1].finish_reason.type == "stop"
        core.check()
    finally:
        core.close()


def _run(core, limit: int = 2000) -> dict[str, list]:
    outs: dict[str, list] = {}
    for _ in range(limit):
        for o in core.step():
            outs.setdefault(o.rid, []).append(o)
        core.check()
        if not core.has_work():
            break
    return outs


@pytest.mark.slow
def test_retracted_requests_resume_their_grammar_and_a_compiling_request_can_be_aborted() -> None:
    from transformers import AutoTokenizer

    from radixlm.config import EngineConfig
    from radixlm.core.engine_core import EngineCore

    path = cached_model_folder("qwen2")
    core = EngineCore(EngineConfig(model_path=str(path), dtype="float32", max_total_tokens=400, chunked_prefill_size=16))
    try:
        # A new grammar is still compiling right after add_request: aborting it answers at once.
        core.add_request(AddRequest(["gone"], [3, 4], SamplingParams(regex="[0-9]{4}z").to_dict()))
        aborted = core.abort("gone", "bye")
        assert aborted is not None and aborted.finish_reason.abort_kind == "client"
        pattern = "[0-9]{120,140}"
        params = SamplingParams(regex=pattern, max_new_tokens=160, temperature=1.0).to_dict()
        for k in range(6):  # distinct prompts (no shared prefix), 6 x (40 + output) > 400 slots
            core.add_request(AddRequest([f"r{k}"], [100 + 50 * k + i for i in range(40)], params))
        outs = _run(core)
        assert core.scheduler.num_retractions > 0, "the pool was meant to run short and retract"
        tok = AutoTokenizer.from_pretrained(path)
        for rid, chunks in outs.items():
            text = tok.decode([t for c in chunks for t in c.new_token_ids], skip_special_tokens=True)
            assert re.fullmatch(pattern, text), (rid, text)
    finally:
        core.close()


def test_structural_tags_in_both_formats(llm) -> None:
    # xgrammar's format: a fixed prefix, then a JSON value from an enum
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "Answer: "},
        {"type": "json_schema", "json_schema": {"enum": ["yes", "no"]}},
    ]}}
    outs = llm.generate(PROMPTS, {"max_new_tokens": 30, "structural_tag": tag, "temperature": 1.0})
    assert all(o["text"] in ('Answer: "yes"', 'Answer: "no"') for o in outs), [o["text"] for o in outs]
    # SGLang's format (free text; after a trigger, the tagged schema): compiles and runs
    sglang_tag = {"structures": [{"begin": "<f>", "schema": {"type": "object"}, "end": "</f>"}], "triggers": ["<f>"]}
    out = llm.generate("t", {"max_new_tokens": 8, "structural_tag": sglang_tag})
    assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def test_the_bitmask_travels_to_other_tensor_parallel_ranks() -> None:
    import msgpack

    from radixlm.model.runner import _bitmask_tensor
    from radixlm.model.step_input import SamplingInput, SpanInput, StepInput, step_from_wire, step_to_wire

    mask = _bitmask([[1, 40], [], [7]], 64)
    step = StepInput(
        spans=[SpanInput(r, 0, [5], [r + 1], True) for r in range(3)],
        sampling=[SamplingInput(SamplingParams(regex="a+"), 1, 0) for _ in range(3)],
        grammar_rows=[0, 2],
        grammar_bitmask=mask,
    )
    back = step_from_wire(msgpack.unpackb(msgpack.packb(step_to_wire(step)), raw=False))
    assert back.grammar_rows == [0, 2] and back.sampling[0].params.regex == "a+"
    assert torch.equal(_bitmask_tensor(back), mask)
    plain = step_from_wire(msgpack.unpackb(msgpack.packb(step_to_wire(StepInput(spans=[]))), raw=False))
    assert plain.grammar_bitmask is None and _bitmask_tensor(plain) is None


def test_sampling_params_check_constraints() -> None:
    assert SamplingParams(json_schema={"type": "object"}).grammar == ("json_schema", '{"type": "object"}')
    with pytest.raises(ValueError, match="cannot be combined"):
        SamplingParams(regex="a", ebnf='root ::= "a"')
    with pytest.raises(ValueError, match="json_schema must be valid JSON"):
        SamplingParams(json_schema="{not json")
    with pytest.raises(ValueError, match="regex must be a non-empty str"):
        SamplingParams(regex="")


# ---- the mask in the sampler -------------------------------------------------------------------------
def _bitmask(allowed: list[list[int]], vocab: int) -> torch.Tensor:
    words = (vocab + 31) // 32
    mask = torch.zeros(len(allowed), words, dtype=torch.int64)
    for r, tokens in enumerate(allowed):
        for t in tokens:
            mask[r, t // 32] |= 1 << (t % 32)
    return ((mask + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)  # as two's-complement int32


def test_bitmask_unpacks_in_xgrammars_layout() -> None:
    allowed = [[0, 31, 32, 99], [5]]
    got = allowed_tokens(_bitmask(allowed, 100), 100)
    assert [torch.nonzero(r).flatten().tolist() for r in got] == allowed


@pytest.mark.parametrize("use_kernel", [True, False], ids=["xgrammar-kernel", "torch"])
def test_mask_applies_to_its_rows_only(use_kernel: bool) -> None:
    logits = torch.randn(3, 70)
    before = logits.clone()
    apply_token_bitmask(logits, _bitmask([[], [3, 64], [1]], 70), [1], use_kernel=use_kernel)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [3, 64]
    every = torch.randn(2, 70)
    apply_token_bitmask(every, _bitmask([[0], [69, 5]], 70), None, use_kernel=use_kernel)
    assert [torch.isfinite(r).nonzero().flatten().tolist() for r in every] == [[0], [5, 69]]


def test_sampler_picks_only_allowed_tokens_greedy_and_sampled() -> None:
    vocab = 300
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.9), SamplingParams()]
    allowed = [[7], [100, 200, 250], []]  # row 2 is not constrained: its mask row is not read
    batch = SamplingBatch.build(params, [1, 2, 3], [[1]] * 3, [[]] * 3, [0], vocab, "cpu",
                                grammar_rows=[0, 1], grammar_bitmask=_bitmask(allowed, vocab))
    for step in range(20):
        logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(step))
        ids = Sampler()(logits, batch).next_token_ids.tolist()
        assert ids[0] == 7 and ids[1] in allowed[1]


def test_min_tokens_ban_skips_grammar_rows() -> None:
    params = [SamplingParams(min_new_tokens=3, temperature=0)] * 2
    batch = SamplingBatch.build(params, [1, 2], [[1]] * 2, [[]] * 2, [0], 64, "cpu",
                                grammar_rows=[1], grammar_bitmask=_bitmask([[], [0]], 64))
    logits = torch.zeros(2, 64)
    logits[:, 0] = 5.0
    ids = Sampler()(logits, batch).next_token_ids.tolist()
    assert ids[0] != 0 and ids[1] == 0  # row 0 is banned from eos; row 1's grammar allows only eos


@pytest.mark.slow
def test_tensor_parallel_ranks_sample_under_the_same_mask(monkeypatch) -> None:
    # Every rank samples; the bitmask crosses to rank 1 inside the StepInput, and the agreement check
    # raises if rank 1 sampled anything else (e.g. without the mask).
    from radixlm.config import EngineConfig
    from radixlm.core.engine_core import EngineCore
    from radixlm.model.parallel import AGREEMENT_ENV

    monkeypatch.setenv(AGREEMENT_ENV, "1")
    core = EngineCore(EngineConfig(model_path=str(cached_model_folder("qwen2")), dtype="float32", tp_size=2,
                                   max_total_tokens=2048))
    try:
        pattern = "[a-z]{2,5}-[0-9]{2}"
        params = SamplingParams(regex=pattern, max_new_tokens=20, temperature=1.0).to_dict()
        core.add_request(AddRequest([f"r{k}" for k in range(4)], [5, 6, 7, 8], params))
        tokens: dict[str, list[int]] = {}
        for _ in range(300):
            for o in core.step():
                tokens.setdefault(o.rid, []).extend(o.new_token_ids)
            if not core.has_work():
                break
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cached_model_folder("qwen2"))
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in tokens.values()]
        assert len(texts) == 4 and all(re.fullmatch(pattern, t) for t in texts), texts
    finally:
        core.close()
