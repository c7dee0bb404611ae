"""Tiny pooling-model folders (random weights, the testing tokenizer), written locally for tests.

    embedding_folder("qwen2_embed")     Qwen2Model + a sentence-transformers config: mean pooling, Normalize
    embedding_folder("bert_embed")      BertModel, no sentence-transformers config: the default (CLS, normalized)
    embedding_folder("modernbert_embed") ModernBertModel: rotary, bidirectional local (sliding-window) layers
    embedding_folder("xlmr_embed")      XLMRobertaModel: positions numbered from padding_idx + 1
    embedding_folder("qwen2_classify")  Qwen2ForSequenceClassification, 3 labels
    embedding_folder("bert_classify")   BertForSequenceClassification, 2 labels
    embedding_folder("bert_masked_lm")  BertForMaskedLM: a head radixlm refuses

The weights are the transformers class's own seeded init, saved with `save_pretrained`, so tensor names
and layout are what a Hub checkpoint of that class holds. Built once per machine under cache_root().
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid
import zlib

import torch

from radixlm.testing import tokenizer as _tok
from radixlm.testing.model_folders import cache_root, make_config

KINDS = (
    "qwen2_embed",
    "bert_embed",
    "modernbert_embed",
    "xlmr_embed",
    "qwen2_classify",
    "bert_classify",
    "bert_masked_lm",
)
_VERSION = 1
_LABELS = {"qwen2_classify": ["negative", "neutral", "positive"], "bert_classify": ["no", "yes"]}


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=_tok.tokenizer_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
        type_vocab_size=2,
        **extra,
    )


def _model(kind: str):
    import transformers

    labels = _LABELS.get(kind)
    label_kwargs = {}
    if labels:
        label_kwargs = {"id2label": dict(enumerate(labels)), "label2id": {v: i for i, v in enumerate(labels)}}
    if kind == "modernbert_embed":
        config = transformers.ModernBertConfig(
            vocab_size=_tok.tokenizer_vocab_size(),
            hidden_size=64,
            num_hidden_layers=3,  # full, local, local: both kinds of layer
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=256,
            local_attention=8,  # a window shorter than the test prompts, so the band mask matters
            pad_token_id=_tok.ENDOFTEXT_ID,
            bos_token_id=_tok.ENDOFTEXT_ID,
            eos_token_id=_tok.ENDOFTEXT_ID,
            cls_token_id=_tok.ENDOFTEXT_ID,
            sep_token_id=_tok.ENDOFTEXT_ID,
        )
        cls = transformers.ModernBertModel
    elif kind == "xlmr_embed":
        config = transformers.XLMRobertaConfig(**_bert_config().to_dict())
        config.max_position_embeddings = 256 + 2  # RoBERTa's numbering starts at pad_token_id + 1 (here 2)
        cls = transformers.XLMRobertaModel
    elif kind.startswith("qwen2"):
        config = make_config("qwen2", "tiny")
        for k, v in label_kwargs.items():
            setattr(config, k, v)
        config.pad_token_id = _tok.ENDOFTEXT_ID
        cls = (
            transformers.Qwen2Model if kind == "qwen2_embed" else transformers.Qwen2ForSequenceClassification
        )
    else:
        config = _bert_config(**label_kwargs)
        cls = {
            "bert_embed": transformers.BertModel,
            "bert_classify": transformers.BertForSequenceClassification,
            "bert_masked_lm": transformers.BertForMaskedLM,
        }[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(kind.encode()))
        model = cls(config)
    return model.eval()


def _write_sentence_transformers(out: pathlib.Path, dim: int) -> None:
    """modules.json + 1_Pooling/config.json (mean) + 2_Normalize, as sentence-transformers saves them."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (out / "2_Normalize").mkdir(exist_ok=True)


def write_embedding_folder(kind: str, out: pathlib.Path) -> pathlib.Path:
    if kind not in KINDS:
        raise ValueError(f"unknown pooling test model {kind!r}; kinds: {', '.join(KINDS)}")
    out.mkdir(parents=True, exist_ok=True)
    model = _model(kind)
    model.save_pretrained(out)
    config = model.config
    _tok.write_tokenizer(out, vocab_size=config.vocab_size, model_max_length=config.max_position_embeddings)
    if kind == "qwen2_embed":
        _write_sentence_transformers(out, config.hidden_size)
    return out


def embedding_folder(kind: str) -> pathlib.Path:
    """The cached folder for `kind`, built atomically (a rename) on first use."""
    root = cache_root()
    final = root / f"pool-{kind}-v{_VERSION}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=uuid.uuid4().hex[:8], dir=root))
    try:
        write_embedding_folder(kind, tmp)
        tmp.chmod(0o755)
        with contextlib.suppress(FileExistsError, OSError):
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not (final / "config.json").is_file():
        raise RuntimeError(f"could not create {final}")
    return final
