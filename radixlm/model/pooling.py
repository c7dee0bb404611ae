"""Pooling: how a prompt's hidden states become one vector (an embedding, or the input of a classifier).

Which pooling runs, in this order:
1. the checkpoint's sentence-transformers config: `modules.json` names a `sentence_transformers.models.Pooling`
   module whose folder holds `config.json` (pooling_mode_cls_token / _mean_tokens / _lasttoken), and a
   `sentence_transformers.models.Normalize` module means the vector is L2-normalized;
2. otherwise vLLM's defaults: the last token for a causal (decoder) model, the first (CLS) token for a
   bidirectional encoder; embeddings L2-normalized (vLLM's `normalize` default for the embed task),
   classifier inputs not (the classifier's logits go through a softmax instead).

A sentence-transformers mode radixlm does not implement (max, weighted mean, mean of sqrt length...) is
refused by name rather than silently replaced by another pooling.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from radixlm.model.loader import ModelLoadError
from radixlm.model.step_input import StepInput

POOLING_TYPES = ("cls", "mean", "last")
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
# sentence-transformers' pooling_mode_* keys -> ours; the rest are refused by name.
_ST_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}
_ST_UNSUPPORTED = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)


@dataclass(frozen=True)
class PoolingSpec:
    """How one model pools: `type` in POOLING_TYPES, `normalize` (L2), and where the choice came from."""

    type: str
    normalize: bool
    source: str

    def __post_init__(self) -> None:
        if self.type not in POOLING_TYPES:
            raise ValueError(f"pooling type must be one of {POOLING_TYPES}, got {self.type!r}")


def read_sentence_transformers(model_path: Path) -> PoolingSpec | None:
    """The pooling a sentence-transformers folder declares, or None when the folder has no modules.json."""
    modules_file = Path(model_path) / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{modules_file}: not readable JSON ({exc})") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{modules_file}: expected a list of module entries")
    types = [m.get("type") for m in modules]
    normalize = _ST_NORMALIZE in types
    pooling = [m for m in modules if m.get("type") == _ST_POOLING]
    if not pooling:
        return None  # e.g. a bare Transformer module: the defaults apply
    folder = Path(model_path) / str(pooling[0].get("path", ""))
    cfg_file = folder / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{cfg_file}: the Pooling module's config is not readable JSON ({exc})"
        ) from None
    unsupported = [k for k in _ST_UNSUPPORTED if cfg.get(k)]
    if unsupported:
        raise ModelLoadError(
            f"{cfg_file}: {unsupported[0]} is set; radixlm pools with {', '.join(_ST_MODES)} only"
        )
    chosen = [ours for key, ours in _ST_MODES.items() if cfg.get(key)]
    if len(chosen) != 1:
        raise ModelLoadError(
            f"{cfg_file}: exactly one of {', '.join(_ST_MODES)} must be true, got {len(chosen)}"
        )
    return PoolingSpec(
        chosen[0], normalize, f"sentence-transformers config ({cfg_file.parent.name}/config.json)"
    )


def default_spec(*, causal: bool, task: str) -> PoolingSpec:
    """vLLM's defaults when the checkpoint says nothing: last token for decoders, CLS for encoders."""
    kind = "last" if causal else "cls"
    who = "a causal model" if causal else "a bidirectional encoder"
    return PoolingSpec(kind, task == "embed", f"default for {who} (vLLM's)")


def resolve_spec(model_path: Path, *, causal: bool, task: str) -> PoolingSpec:
    """The checkpoint's sentence-transformers pooling for embeddings, else the default. A classifier pools
    as its own head expects (last token for decoders, CLS for encoders), whatever modules.json says."""
    if task == "embed":
        declared = read_sentence_transformers(model_path)
        if declared is not None:
            return declared
    return default_spec(causal=causal, task=task)


def pool(hidden: torch.Tensor, lengths: list[int], spec: PoolingSpec) -> torch.Tensor:
    """hidden [sum(lengths), H], one whole prompt after another -> [len(lengths), H] pooled (fp32 math
    for the mean and the norm, then the hidden dtype)."""
    starts = torch.tensor([0, *lengths[:-1]], device=hidden.device).cumsum(0)
    ends = starts + torch.tensor(lengths, device=hidden.device)
    if spec.type == "cls":
        out = hidden.index_select(0, starts)
    elif spec.type == "last":
        out = hidden.index_select(0, ends - 1)
    else:  # mean: one segment sum per prompt, no Python loop over tokens
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), ends - starts)
        sums = torch.zeros(len(lengths), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, seg, hidden.float())
        out = (sums / (ends - starts).unsqueeze(1).float()).to(hidden.dtype)
    if spec.normalize:
        out = torch.nn.functional.normalize(out.float(), p=2, dim=-1).to(hidden.dtype)
    return out


def pool_step(
    pool_fn: Callable[[torch.Tensor, list[int]], torch.Tensor], hidden: torch.Tensor, step: StepInput
) -> torch.Tensor:
    """The vectors of the step's pooling spans (each a whole prompt), in span order: pool_fn over their rows."""
    lengths = [s.length for s in step.spans]
    if len(step.pool_spans) == len(step.spans):
        return pool_fn(hidden, lengths)
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    rows = torch.cat(
        [torch.arange(starts[i], starts[i] + lengths[i], device=hidden.device) for i in step.pool_spans]
    )
    return pool_fn(hidden.index_select(0, rows), [lengths[i] for i in step.pool_spans])
