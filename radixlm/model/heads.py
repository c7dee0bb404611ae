"""Which head a checkpoint has, from `config.architectures`: what the engine does with the model (its task).

    *ForCausalLM / *LMHeadModel / *ForConditionalGeneration   -> "generate" (the causal LM, as before)
    a bare base model (Qwen2Model, LlamaModel, BertModel, ...)  -> "embed"    (hidden states, pooled)
    a sentence-transformers folder (modules.json)               -> "embed"    (whatever the architecture)
    *ForSequenceClassification                                  -> "classify" (pooled, then the model's head)
    any other head (ForMaskedLM, ForTokenClassification, ...)   -> refused at load, by name

A config that names no architecture is a causal LM (transformers' own default for generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from radixlm.model.loader import ModelLoadError

TASKS = ("generate", "embed", "classify")
SUPPORTED_HEADS = (
    "*ForCausalLM (and *LMHeadModel, *ForConditionalGeneration): generate",
    "a bare base model such as Qwen2Model, LlamaModel or BertModel, or a sentence-transformers folder: embed",
    "*ForSequenceClassification with a linear `score` head (decoders) or BERT's pooler + `classifier`: classify",
)
_GENERATE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass(frozen=True)
class HeadChoice:
    task: str  # one of TASKS
    head: str  # the class config.architectures names (or the base class built for a sentence-transformers folder)
    reason: str
    model_cls: type | None = None  # the transformers class to build for a pooling task; None for generate


def _unsupported(name: str) -> ModelLoadError:
    return ModelLoadError(
        f"config.architectures names {name}, a head radixlm does not run; supported heads: "
        + "; ".join(SUPPORTED_HEADS)
    )


def resolve_head(config, model_path: Path) -> HeadChoice:
    """The task and the class to build, or a ModelLoadError naming an unsupported head."""
    archs = list(getattr(config, "architectures", None) or [])
    name = archs[0] if archs else ""
    sentence_transformers = (Path(model_path) / "modules.json").is_file()
    if not name and not sentence_transformers:
        return HeadChoice("generate", type(config).__name__, "config.architectures is empty: a causal LM")
    if name.endswith("ForSequenceClassification"):
        return HeadChoice("classify", name, f"config.architectures names {name}", _transformers_class(name))
    if sentence_transformers:
        base = _base_model_class(config)
        why = f"a sentence-transformers folder (modules.json), built as {base.__name__}"
        return HeadChoice("embed", name or base.__name__, why, base)
    if name.endswith(_GENERATE_SUFFIXES) or _is_causal_lm(config, name):
        return HeadChoice("generate", name, f"config.architectures names {name}")
    try:
        base: type | None = _base_model_class(config)
    except ModelLoadError:
        base = None
    if base is not None and name == base.__name__:
        return HeadChoice("embed", name, f"config.architectures names the bare base model {name}", base)
    import transformers

    if getattr(transformers, name, None) is not None:  # a head transformers has and radixlm does not run
        raise _unsupported(name)
    # A name transformers does not know (remote code, a renamed class): the causal path decides, as before.
    return HeadChoice("generate", name, f"config.architectures names {name}")


def _is_causal_lm(config, name: str) -> bool:
    """The name is one of transformers' causal-LM classes, or the model ships its own causal LM."""
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        if name in (v if isinstance(v, (list, tuple)) else [v]):
            return True
    return False


def _transformers_class(name: str) -> type:
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise ModelLoadError(
            f"config.architectures names {name}, which the installed transformers does not have"
        )
    return cls


def _base_model_class(config) -> type:
    """transformers' AutoModel class for the config: the model without any head."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise ModelLoadError(
            f"transformers has no base model class for config {type(config).__name__} "
            f"(model_type {getattr(config, 'model_type', '?')!r})"
        ) from None


def pooling_impl(head: HeadChoice, model_impl: str):
    """A pooling model always runs on the Transformers backend (the native models are causal LMs only)."""
    from radixlm.model.registry import ImplChoice

    if model_impl == "native":
        raise ModelLoadError(
            f"model_impl='native' was asked for, but {head.head} is a {head.task} model and radixlm's native "
            "implementations are causal LMs; use model_impl='auto' or 'transformers'"
        )
    return ImplChoice(
        "transformers", head.head, f"{head.reason}: task {head.task!r}, on the Transformers backend"
    )


def pooling_info(model, config) -> dict:
    """ModelInfo's pooling fields for a loaded model (empty for a causal LM)."""
    spec = getattr(model, "pooling_spec", None)
    if spec is None:
        return {}
    out = {"pooling": f"{spec.type}{', L2-normalized' if spec.normalize else ''} ({spec.source})"}
    if getattr(model, "task", None) == "classify":
        id2label = getattr(config, "id2label", None) or {}
        n = int(getattr(config, "num_labels", len(id2label)))
        out["labels"] = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]
    return out
