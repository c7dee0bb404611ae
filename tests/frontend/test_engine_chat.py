"""Engine.chat / async_chat (one conversation or a batch, the chat template applied), and the model's
generation_config.json sampling defaults for what a call leaves unset."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from radixlm import Engine, SamplingParams
from radixlm.frontend.generation_defaults import read_sampling_defaults
from radixlm.testing import cached_model_folder

GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
HI = [{"role": "user", "content": "Hi there"}]
STORY = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "A story?"}]


def _engine(model: Path | str, **options) -> Engine:
    return Engine(
        model_path=str(model), dtype="float32", max_total_tokens=2048, inline_core=True, log_level="warning", **options
    )


@pytest.fixture(scope="module")
def llm():
    with _engine(cached_model_folder("qwen2")) as engine:
        yield engine


def test_chat_one_conversation_is_generate_over_the_template(llm: Engine) -> None:
    out = llm.chat(HI, GREEDY)
    assert isinstance(out, dict) and len(out["output_ids"]) == 6
    ids = llm.tokenizer_manager.apply_chat_template(HI)
    assert out["meta_info"]["prompt_tokens"] == len(ids)
    assert out["output_ids"] == llm.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]


def test_chat_batch_keeps_order_and_streams(llm: Engine) -> None:
    one, two = llm.chat(HI, GREEDY), llm.chat(STORY, GREEDY)
    batch = llm.chat([HI, STORY], GREEDY)
    assert isinstance(batch, list) and [b["output_ids"] for b in batch] == [one["output_ids"], two["output_ids"]]
    chunks = list(llm.chat(HI, GREEDY, stream=True))
    assert sum((c["output_ids"] for c in chunks), []) == one["output_ids"]
    # n > 1 for one conversation: a list of n, as generate returns.
    many = llm.chat(HI, {**GREEDY, "n": 2})
    assert isinstance(many, list) and len(many) == 2


def test_async_chat_and_template_kwargs(llm: Engine) -> None:
    async def main():
        return await llm.async_chat([HI], GREEDY, return_logprob=True, chat_template_kwargs={"unused_var": 1})

    (out,) = asyncio.run(main())
    assert out["output_ids"] == llm.chat(HI, GREEDY)["output_ids"]
    assert len(out["meta_info"]["output_token_logprobs"]) == 6


@pytest.mark.parametrize(
    ("messages", "where"),
    [([], "messages"), ("hi", "messages"), ([{"content": "x"}], "messages[0]"), ([HI, []], "messages[1]")],
)
def test_chat_refuses_malformed_messages_naming_where(llm: Engine, messages, where: str) -> None:
    with pytest.raises(ValueError, match=rf"^{where.replace('[', '.').replace(']', '.')}"):
        llm.chat(messages, GREEDY)


# ---- generation_config.json ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def greedy_by_default_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model whose generation_config.json sets top_k 1 (greedy) with other sampling defaults."""
    out = tmp_path_factory.mktemp("gen-defaults")
    shutil.copytree(cached_model_folder("qwen2"), out, dirs_exist_ok=True)
    path = out / "generation_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "temperature": 0.6, "top_p": 0.9, "top_k": 1, "repetition_penalty": 1.0}))
    return out


def test_generation_config_sampling_defaults_are_read() -> None:
    assert read_sampling_defaults(cached_model_folder("qwen2")) == {}  # the file sets no sampling keys


def test_generation_config_defaults_fill_what_a_call_leaves_unset(greedy_by_default_model: Path) -> None:
    prompt, limit = "The weather today", {"max_new_tokens": 8, "ignore_eos": True}
    with _engine(greedy_by_default_model) as llm:
        assert llm.sampling_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 1, "repetition_penalty": 1.0}
        greedy = llm.generate(prompt, {**limit, "temperature": 0})["output_ids"]
        # Unseeded and without a temperature: greedy, because the file's top_k is 1.
        assert [llm.generate(prompt, limit)["output_ids"] for _ in range(3)] == [greedy] * 3
        assert llm.generate(prompt)["output_ids"][:8] == greedy  # no sampling_params at all
        # What the call sets wins; a SamplingParams object is complete and used as it is.
        sampled = {tuple(llm.generate(prompt, {**limit, "top_k": -1, "seed": s})["output_ids"]) for s in range(4)}
        assert len(sampled) > 1
        explicit = {tuple(llm.generate(prompt, SamplingParams(**limit, seed=s))["output_ids"]) for s in range(4)}
        assert len(explicit) > 1
    with _engine(greedy_by_default_model, generation_config="none") as llm:
        assert llm.sampling_defaults == {}
        unseeded = {tuple(llm.generate(prompt, limit)["output_ids"]) for _ in range(4)}
        assert len(unseeded) > 1


def test_a_bad_generation_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 7}))
    with pytest.raises(ValueError, match=r"generation_config.json: sampling_params.top_p"):
        read_sampling_defaults(tmp_path)
