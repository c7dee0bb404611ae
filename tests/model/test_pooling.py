"""Pooling models (embeddings, classification) against transformers, in float32.

The oracle is transformers' own model on the same folder plus the same pooling written out here
(sentence-transformers' mean / CLS / last token, L2 norm), or the *ForSequenceClassification's own logits.
The BERT checks also prove attention is bidirectional: with causal attention the CLS state would see
only itself.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from radixlm import Engine
from radixlm.messages import ModelLoadError
from radixlm.model.heads import resolve_head
from radixlm.model.pooling import PoolingSpec, pool, read_sentence_transformers
from radixlm.testing import cached_model_folder
from radixlm.testing.embedding_models import embedding_folder

TOL = 1e-5
# Lengths 1 .. 40, so spans of one token (the decode-shaped path), short and long prompts all appear.
# [5, 0, 6, 7] holds id 0, XLM-R's pad id inside a prompt (its position number stays padding_idx).
PROMPTS = [[5], [7, 8], list(range(10, 27)), list(range(100, 140)), [3, 1, 4, 1, 5, 9, 2, 6], [5, 0, 6, 7]]


def _engine(kind: str, **kw) -> Engine:
    return Engine(
        model_path=str(embedding_folder(kind)), dtype="float32", inline_core=True, log_level="warning", **kw
    )


def _hf(kind: str):
    path = embedding_folder(kind)
    cls = getattr(transformers, transformers.AutoConfig.from_pretrained(path).architectures[0])
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _reference(model, ids: list[int], how: str) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids]))
    if how == "logits":
        return out.logits[0]
    h = out.last_hidden_state[0]
    vec = {"mean": h.mean(0), "cls": h[0], "last": h[-1]}[how]
    return torch.nn.functional.normalize(vec, dim=-1)


@pytest.fixture(scope="module")
def bert_engine():
    with _engine("bert_embed") as llm:
        yield llm


@pytest.mark.parametrize(
    ("kind", "how"),
    [("bert_embed", "cls"), ("qwen2_embed", "mean"), ("modernbert_embed", "cls"), ("xlmr_embed", "cls")],
)
def test_embeddings_equal_transformers(kind: str, how: str, bert_engine) -> None:
    """BertModel without a sentence-transformers config pools CLS (normalized, vLLM's default for an
    encoder); the Qwen2Model folder's modules.json says mean + Normalize; ModernBERT's local layers attend
    inside a bidirectional band (window 8, shorter than the 17- and 40-token prompts); XLM-R numbers
    positions from padding_idx + 1 per prompt."""
    model = _hf(kind)
    if kind == "bert_embed":
        out = bert_engine.encode(input_ids=PROMPTS)
        info = bert_engine.model_info
    else:
        with _engine(kind) as llm:
            out = llm.encode(input_ids=PROMPTS)
            info = llm.model_info
    assert info["task"] == "embed"
    assert info["pooling"].startswith(f"{how}, L2-normalized")
    for ids, got in zip(PROMPTS, out):
        ref = _reference(model, ids, how)
        assert got["meta_info"]["prompt_tokens"] == len(ids)
        err = (torch.tensor(got["embedding"]) - ref).abs().max().item()
        assert err < TOL, f"{kind}, {len(ids)} tokens: max error {err}"


def test_mean_pooling_under_chunked_prefill() -> None:
    """A 40-token prompt with chunked_prefill_size 8: the pooling request is scheduled whole (never
    chunked), so the mean still covers every position; a short prompt in the same call shares the step."""
    model = _hf("qwen2_embed")
    with _engine("qwen2_embed", chunked_prefill_size=8, max_prefill_tokens=8) as llm:
        out = llm.encode(input_ids=[PROMPTS[3], PROMPTS[1], PROMPTS[2]])
        llm.check()
        steps = llm.get_server_info()["num_steps"]
    for ids, got in zip([PROMPTS[3], PROMPTS[1], PROMPTS[2]], out):
        err = (torch.tensor(got["embedding"]) - _reference(model, ids, "mean")).abs().max().item()
        assert err < TOL, f"{len(ids)} tokens: max error {err}"
    assert steps == 3  # each over-budget prompt ran alone, unsplit


@pytest.mark.parametrize("kind", ["qwen2_classify", "bert_classify"])
def test_classification_logits_equal_transformers(kind: str) -> None:
    model = _hf(kind)
    with _engine(kind) as llm:
        out = llm.encode(input_ids=PROMPTS)
        info = llm.model_info
    assert info["task"] == "classify"
    assert info["labels"] == [model.config.id2label[i] for i in range(model.config.num_labels)]
    for ids, got in zip(PROMPTS, out):
        ref = _reference(model, ids, "logits")
        assert len(got["embedding"]) == model.config.num_labels
        err = (torch.tensor(got["embedding"]) - ref).abs().max().item()
        assert err < TOL, f"{kind}, {len(ids)} tokens: max error {err}"
        probs = torch.softmax(torch.tensor(got["embedding"]), -1)
        assert (probs - torch.softmax(ref, -1)).abs().max().item() < TOL


def test_batch_of_256_in_one_call_keeps_order(bert_engine) -> None:
    model = _hf("bert_embed")
    prompts = [[(i * 7 + j) % 2000 + 1 for j in range(1 + i % 13)] for i in range(256)]
    out = bert_engine.encode(input_ids=prompts)
    assert len(out) == 256
    refs: dict[int, torch.Tensor] = {}
    with torch.no_grad():  # one batched reference forward per prompt length: no padding, exact values
        for n in {len(p) for p in prompts}:
            idx = [i for i, p in enumerate(prompts) if len(p) == n]
            h = model(input_ids=torch.tensor([prompts[i] for i in idx])).last_hidden_state[:, 0]
            refs.update(zip(idx, torch.nn.functional.normalize(h, dim=-1)))
    for i, got in enumerate(out):
        assert got["meta_info"]["prompt_tokens"] == len(prompts[i])
        assert (torch.tensor(got["embedding"]) - refs[i]).abs().max().item() < TOL, i
    bert_engine.check()


def test_text_single_prompt_returns_a_dict(bert_engine) -> None:
    one = bert_engine.encode("hello world")
    assert set(one) == {"embedding", "meta_info"} and len(one["embedding"]) == 64
    again = bert_engine.encode(["hello world"])[0]
    assert again["embedding"] == one["embedding"]


def test_generate_on_an_embedding_model_is_refused(bert_engine) -> None:
    with pytest.raises(ValueError, match="BertModel is a pooling model"):
        bert_engine.generate("hi", {"max_new_tokens": 2})


def test_encode_on_a_generator_is_refused() -> None:
    with Engine(model_path=str(cached_model_folder("qwen2")), inline_core=True, log_level="warning") as llm:
        with pytest.raises(ValueError, match="encode needs an embedding or classification model"):
            llm.encode("hi")


def test_unsupported_head_is_refused_by_name() -> None:
    with pytest.raises(ModelLoadError, match="BertForMaskedLM, a head radixlm does not run"):
        _engine("bert_masked_lm")


def test_heads_from_architectures() -> None:
    tasks = {k: resolve_head(transformers.AutoConfig.from_pretrained(embedding_folder(k)), embedding_folder(k))
             for k in ("qwen2_embed", "bert_embed", "qwen2_classify")}  # fmt: skip
    assert {k: v.task for k, v in tasks.items()} == {
        "qwen2_embed": "embed", "bert_embed": "embed", "qwen2_classify": "classify"
    }  # fmt: skip
    causal = cached_model_folder("qwen2")
    assert resolve_head(transformers.AutoConfig.from_pretrained(causal), causal).task == "generate"


def _st_folder(tmp_path, pooling: dict, normalize: bool):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]  # fmt: skip
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return tmp_path


def test_sentence_transformers_config(tmp_path) -> None:
    spec = read_sentence_transformers(_st_folder(tmp_path, {"pooling_mode_lasttoken": True}, normalize=False))
    assert (spec.type, spec.normalize) == ("last", False)
    assert read_sentence_transformers(tmp_path / "nothing-here") is None


def test_unsupported_sentence_transformers_mode_is_refused(tmp_path) -> None:
    folder = _st_folder(tmp_path, {"pooling_mode_max_tokens": True}, normalize=True)
    with pytest.raises(ModelLoadError, match="pooling_mode_max_tokens"):
        read_sentence_transformers(folder)


def test_pool_packed_prompts() -> None:
    h = torch.randn(9, 4)
    lengths = [2, 3, 4]
    parts = h.split(lengths)
    for kind, ref in (
        ("cls", [p[0] for p in parts]),
        ("last", [p[-1] for p in parts]),
        ("mean", [p.mean(0) for p in parts]),
    ):
        got = pool(h, lengths, PoolingSpec(kind, False, "test"))
        assert torch.allclose(got, torch.stack(ref), atol=1e-6), kind
    normed = pool(h, lengths, PoolingSpec("mean", True, "test"))
    assert torch.allclose(normed.norm(dim=-1), torch.ones(3), atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "task", "pooling", "attention"),
    [
        ("bert_embed", "embed", "cls, L2-normalized (default", "bidirectional"),
        ("qwen2_embed", "embed", "mean, L2-normalized (sentence-transformers", "causal"),
        ("qwen2_classify", "classify", "last (default", "causal"),
        ("bert_classify", "classify", "cls (default", "bidirectional"),
        ("modernbert_embed", "embed", "cls, L2-normalized (default", "bidirectional"),
    ],
)
def test_check_model_prints_the_task(kind: str, task: str, pooling: str, attention: str) -> None:
    from radixlm.check_model import inspect

    report = inspect(str(embedding_folder(kind)))
    fields = dict(report.lines)
    assert fields["verdict"] == "runs", report.render()
    assert fields["task"].startswith(task) and fields["pooling"].startswith(pooling)
    assert fields["builds"].endswith(f"attention {attention})")


def test_check_model_refuses_an_unsupported_head() -> None:
    from radixlm.check_model import main

    assert main([str(embedding_folder("bert_masked_lm"))]) == 1


def test_bidirectional_groups_pad_at_most_twice_and_match_per_prompt_attention() -> None:
    """The encoder path pads prompts into groups (one SDPA each): padding stays within 2x the real
    tokens, and every prompt's output equals its own unpadded bidirectional attention (GQA, a window)."""
    from types import SimpleNamespace

    from radixlm.layers.attention_backends.bidirectional import BidirectionalPlan, attend_bidirectional

    lens = [40, 1, 3, 17, 2, 9, 1]
    T = sum(lens)
    fb = SimpleNamespace(extend_lens_list=lens, prefix_lens_list=[0] * len(lens), input_ids=torch.zeros(T))
    plan = BidirectionalPlan.build(fb)
    assert len(plan.groups) > 1
    for g in plan.groups:
        assert g.valid.numel() <= 2 * int(g.valid.sum())
    torch.manual_seed(0)
    q, k, v = torch.randn(T, 4, 8), torch.randn(T, 2, 8), torch.randn(T, 2, 8)
    for window in (None, 3):
        got = attend_bidirectional(q, k, v, plan, 0.3, window)
        start = 0
        for n in lens:
            sl = slice(start, start + n)
            pos = torch.arange(n)
            mask = None if window is None else ((pos[:, None] - pos[None, :]).abs() < window)
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
                attn_mask=mask, scale=0.3, enable_gqa=True,
            ).transpose(0, 1)  # fmt: skip
            assert torch.allclose(got[sl], ref, atol=1e-6), (n, window)
            start += n


def test_async_encode(bert_engine) -> None:
    import asyncio

    out = asyncio.run(bert_engine.async_encode(input_ids=[[5, 6], [7]]))
    assert [len(o["embedding"]) for o in out] == [64, 64]
    alone = bert_engine.encode(input_ids=[7])[
        "embedding"
    ]  # batched with another prompt or alone: same vector
    assert (torch.tensor(out[1]["embedding"]) - torch.tensor(alone)).abs().max().item() < TOL
