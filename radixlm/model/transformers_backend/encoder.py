"""Pooling models through the Transformers backend: a bare base model (embeddings) or a
*ForSequenceClassification (labels), with attention through RadixAttention like the causal LMs.

What differs from TransformersCausalLM (causal.py), and why:
- The class built is the one the head calls for (model/heads.py), not the causal LM; its layers are the
  base model (`base_model`), which for a bare base model is the model itself.
- Attention is causal or bidirectional as the model's attention modules say (`is_causal`): a decoder
  embedding model (Qwen2Model) attends causally, an encoder (BERT) over the whole prompt. A bidirectional
  prompt must be in one forward (its first token's state depends on its last), so pooling requests are
  never chunked and never share a prefix (core/scheduler.py, core/engine_core.py).
- Instead of logits, `pool` returns one vector per prompt: the pooled hidden state (model/pooling.py) or,
  for a classifier, its head's logits over that pooled state (the server applies the softmax).
- Encoders take `token_type_ids` (zeros: one segment) explicitly, since their buffered default is only as
  long as max_position_embeddings and a step packs many prompts into one sequence.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from radixlm.model.forward_batch import ForwardBatch
from radixlm.model.heads import HeadChoice
from radixlm.model.loader import ModelLoadError
from radixlm.model.pooling import PoolingSpec, pool, resolve_spec
from radixlm.model.transformers_backend.causal import TransformersCausalLM, _Step, _stepping


class TransformersPoolingModel(TransformersCausalLM):
    """A transformers base model or sequence classifier, run for its pooled prompt states."""

    def __init__(
        self,
        config,
        model_path: Path,
        head: HeadChoice,
        *,
        trust_remote_code: bool,
        dtype: torch.dtype,
        tp_size: int = 1,
    ) -> None:
        if tp_size > 1:
            raise ModelLoadError(
                f"{head.head}: pooling models run at tp_size 1 in radixlm (no tensor-parallel plan for their heads)"
            )
        if head.model_cls is None:
            raise ModelLoadError(f"{head.head}: no transformers class to build for task {head.task!r}")
        super().__init__(
            config, model_path, trust_remote_code=trust_remote_code, dtype=dtype, model_cls=head.model_cls
        )
        self.task = head.task
        self._base_is_model = self.hf.base_model is self.hf
        self._skip: tuple[str, ...] = ()
        base = self.hf.base_model
        if self.task == "embed" and isinstance(getattr(base, "pooler", None), nn.Module):
            # BERT's pooler (dense + tanh on CLS) is a pretraining head: sentence-transformers and vLLM pool
            # the last hidden states themselves, so it is not built and its tensors are skipped.
            base.pooler = None
            self._skip = ("pooler.",)
        if self.task == "embed" and head.head.endswith(("ForCausalLM", "LMHeadModel")):
            self._skip += ("lm_head.",)  # a sentence-transformers folder saved from the causal LM
        self.causal = self._attention_is_causal()
        self.pooling_spec: PoolingSpec = resolve_spec(model_path, causal=self.causal, task=self.task)
        # Not a registered submodule: its parameters are the model's own (hf.score, hf.classifier), loaded there.
        object.__setattr__(
            self, "_classify_head", self._find_classifier() if self.task == "classify" else None
        )
        self._takes_token_types = "token_type_ids" in inspect.signature(base.forward).parameters
        # RoBERTa-family embeddings number positions from padding_idx + 1 and give pad tokens padding_idx
        # (transformers derives them from input_ids, which would run across the packed prompts).
        emb = getattr(base, "embeddings", None)
        self._position_pad: int | None = None
        if (
            hasattr(emb, "create_position_ids_from_input_ids")
            and getattr(emb, "padding_idx", None) is not None
        ):
            self._position_pad = int(emb.padding_idx)

    @property
    def _decoder(self) -> nn.Module:
        return self.hf.base_model

    def _attention_is_causal(self) -> bool:
        flags = {
            bool(m.is_causal)
            for m in self.hf.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "is_causal")
        }
        if len(flags) > 1:
            raise ModelLoadError(
                f"{type(self.hf).__name__} mixes causal and bidirectional attention layers; radixlm runs one kind"
            )
        return flags != {False}  # no flag at all: a decoder, causal as transformers' default

    def _find_classifier(self) -> nn.Module:
        """The module that turns the pooled state into logits: a decoder's linear `score`, or BERT's
        pooler + `classifier` linear. Other heads (RoBERTa's two-layer head on the sequence...) are refused."""
        score = getattr(self.hf, "score", None)
        if isinstance(score, nn.Linear) and self.causal:
            return score
        classifier = getattr(self.hf, "classifier", None)
        pooler = getattr(self.hf.base_model, "pooler", None)
        if isinstance(classifier, nn.Linear) and isinstance(pooler, nn.Module) and not self.causal:
            return nn.Sequential(_PoolerOnVector(pooler), classifier)
        raise ModelLoadError(
            f"{type(self.hf).__name__}: its classification head is neither a decoder's linear `score` nor "
            "BERT's pooler + linear `classifier`; radixlm does not run it"
        )

    def measure_attention(self) -> None:
        super().measure_attention()
        for attn in self.attn_layers:
            attn.causal = self.causal
            extra = [n for n in ("softcap", "attention_chunk") if getattr(attn, n) is not None]
            if not self.causal and extra:
                # The bidirectional path attends each prompt whole (with a band for sliding windows); it
                # builds no softcap or chunk masks.
                raise ModelLoadError(
                    f"{type(self.hf).__name__}: bidirectional attention with {extra[0]} (layer "
                    f"{attn.layer_id}) is not supported by radixlm's attention backend"
                )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        step = _Step(forward_batch, self._layer_calls, [0] * len(self._layer_calls))
        kwargs = {}
        if self._takes_token_types:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids).unsqueeze(0)
        if self._position_pad is not None:
            positions = _padding_offset_positions(input_ids, positions, self._position_pad)
        with _stepping(step):
            out = self._decoder(
                input_ids=input_ids.unsqueeze(0),
                position_ids=positions.unsqueeze(0),
                use_cache=False,
                **kwargs,
            )
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            f"{type(self.hf).__name__} is a pooling model ({self.task}); it has no LM head to sample from"
        )

    def pool(self, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """hidden [sum(lengths), H] of whole prompts -> [N, H] embeddings, or [N, num_labels] logits."""
        pooled = pool(hidden, lengths, self.pooling_spec)
        if self._classify_head is None:
            return pooled
        return self._classify_head(pooled)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._names_for_model(weights))

    def _names_for_model(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """Checkpoint names as this model's modules: a bare base model saved under its prefix (BERT's
        `bert.`, a causal LM's `model.`) loses the prefix; skipped heads are dropped."""
        prefix = self.hf.base_model_prefix + "."
        for name, tensor in weights:
            if self._base_is_model and name.startswith(prefix):
                name = name[len(prefix) :]
            if self._skip and name.startswith(self._skip):
                continue
            yield name, tensor


def _padding_offset_positions(input_ids: torch.Tensor, positions: torch.Tensor, pad: int) -> torch.Tensor:
    """RoBERTa's numbering per packed prompt: pad + (non-pad tokens so far) for a non-pad token, pad for a
    pad token. `positions` restart at 0 with each prompt (pooling prompts are whole), which finds each
    token's prompt start without a loop."""
    real = (input_ids != pad).long()
    counted = torch.cumsum(real, 0)
    start = torch.arange(input_ids.shape[0], device=input_ids.device) - positions
    before = (counted - real).index_select(0, start)  # non-pad tokens before the prompt began
    return (counted - before) * real + pad


class _PoolerOnVector(nn.Module):
    """BERT's pooler reads position 0 of a [B, T, H] sequence; here it gets the pooled [B, H] vector."""

    def __init__(self, pooler: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooler(x.unsqueeze(1))
