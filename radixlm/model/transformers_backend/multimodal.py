"""Vision-language models through the Transformers backend: the vision tower is transformers' own code, the
language model runs through our attention and scheduler.

Per step (TransformersVLM.forward):
1. the step's token ids are embedded by the model's own input embedding; image positions hold the prefix
   cache's key ids there (>= vocab, core/request.image_key_ids), which are looked up as id 0 and then
   overwritten;
2. each image a span covers gets its features from the model's own `get_image_features` (vision tower and
   projector), computed once per image and kept by hash (an LRU of IMAGE_FEATURE_CACHE images), so a prompt
   chunked through an image slices the same features per chunk, and a prefix-cache hit that covers the
   image never runs the tower (no span covers it);
3. the features replace the embeddings at their positions and the language model runs on `inputs_embeds`
   with our attention. Gemma 3's image tokens attend to each other both ways (transformers builds that
   from token_type_ids): each image is a block in ForwardBatch.image_blocks that the attention mask opens,
   and the scheduler never ends a span inside one (core/request.fit_image_blocks).

Supported: LLaVA, Gemma 3 and Qwen2-VL (token-identical to transformers in tests/model/test_vlm.py).
Qwen2-VL's language model uses M-RoPE: its prompt's 3-D positions come from the model's own
get_rope_index once per request (mrope_prompt_positions, called by the core), ForwardBatch.mrope_positions
carries them per step ([3, T], model/mrope.py) and transformers' rotary applies them; our attention keeps
the 1-D positions. Qwen2.5-VL (time-scaled video positions, a window-attention tower), Qwen3-VL and GLM-4V
are not checked yet: refused by name.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from radixlm.model.forward_batch import ForwardBatch
from radixlm.model.loader import ModelLoadError
from radixlm.model.transformers_backend.causal import TransformersCausalLM, _Step, _stepping

logger = logging.getLogger(__name__)

SUPPORTED_VLM_TYPES = ("llava", "gemma3", "qwen2_vl")
# model_type -> why radixlm cannot run it yet
REFUSED_VLM_TYPES = {
    t: "its language model uses M-RoPE (3-D positions from get_rope_index, a rope delta at decode), which "
    "radixlm's 1-D positions do not carry yet"
    for t in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe")
}
# Image tokens that attend to their whole image (transformers' token_type_ids mask), by model_type.
BIDIRECTIONAL_IMAGE_TYPES = ("gemma3",)
# Language models whose rotary takes (temporal, height, width) positions from get_rope_index.
MROPE_TYPES = ("qwen2_vl",)
IMAGE_FEATURE_CACHE = 16  # images whose features are kept between steps (a chunked prompt's, mostly)
VISION_ATTENTION = "sdpa"  # the vision tower keeps transformers' attention, as from_pretrained picks it

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}


def is_vision_language(config) -> bool:
    """A composite config with a vision tower that this module runs (or refuses by name). Other composite
    types (Llama 4, Mllama, Gemma 4, ...) keep the text-only causal path they had (causal.py)."""
    if getattr(config, "vision_config", None) is None:
        return False
    return getattr(config, "model_type", None) in (*SUPPORTED_VLM_TYPES, *REFUSED_VLM_TYPES)


def vlm_model_class(config) -> type:
    """The transformers image-text-to-text class for the config, or a ModelLoadError naming why not."""
    model_type = getattr(config, "model_type", "?")
    if model_type in REFUSED_VLM_TYPES:
        raise ModelLoadError(f"vision-language model type {model_type!r}: {REFUSED_VLM_TYPES[model_type]}")
    if model_type not in SUPPORTED_VLM_TYPES:
        raise ModelLoadError(
            f"vision-language model type {model_type!r} is not supported; radixlm runs "
            f"{', '.join(SUPPORTED_VLM_TYPES)} (checked token-identical against transformers)"
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]


def tensor_from_wire(spec: list[Any], what: str) -> torch.Tensor:
    """[dtype, shape, raw bytes] (frontend/multimodal.tensor_to_wire) -> a CPU tensor."""
    try:
        dtype_name, shape, raw = spec
        dtype = _DTYPES[dtype_name]
        return torch.frombuffer(bytearray(raw), dtype=dtype).view(*shape)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"image tensor {what!r} is not [dtype, shape, bytes] of a supported dtype: {exc}"
        ) from None


class TransformersVLM(TransformersCausalLM):
    """A *ForConditionalGeneration VLM: text positions through the embedding, image positions through the
    model's vision tower, the language model through radixlm's attention."""

    multimodal = True

    def __init__(
        self,
        config,
        model_path: Path,
        *,
        trust_remote_code: bool,
        dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        cls = vlm_model_class(config)
        if tp_size > 1:
            raise ModelLoadError(
                f"{cls.__name__}: vision-language models run at tp_size 1 (the vision tower is not split)"
            )
        super().__init__(config, model_path, trust_remote_code=trust_remote_code, dtype=dtype, model_cls=cls)
        self.model_type = config.model_type
        self.image_token_id = int(config.image_token_id)
        self.bidirectional_images = self.model_type in BIDIRECTIONAL_IMAGE_TYPES
        inner = self.hf.model
        self._vision = inner
        self._language_model = inner.language_model
        # The composite config's attention implementation reached the vision tower's config too; the tower is
        # transformers' own code, with transformers' own attention.
        tower = inner.visual if self.model_type in MROPE_TYPES else inner.vision_tower
        for module in tower.modules():
            cfg = getattr(module, "config", None)
            if cfg is not None:
                cfg._attn_implementation = VISION_ATTENTION
        self._features: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.vision_runs = 0  # how many images the vision tower encoded (tests: a cache hit runs none)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        embeds = self._embed(input_ids, forward_batch)
        step = _Step(forward_batch, self._layer_calls, [0] * len(self._layer_calls))
        rows = forward_batch.mrope_positions  # [3, T] for M-RoPE steps with images; the rotary reads it
        position_ids = rows.unsqueeze(1) if rows is not None else positions.unsqueeze(0)
        with _stepping(step):
            out = self._language_model(
                inputs_embeds=embeds.unsqueeze(0), position_ids=position_ids, use_cache=False
            )
        return out.last_hidden_state[0]

    def mrope_prompt_positions(
        self, input_ids: list[int], images: list[dict[str, Any]]
    ) -> tuple[list[list[int]], int] | None:
        """M-RoPE models: the prompt's (temporal, height, width) position rows and the delta for the tokens
        after it, from the model's own get_rope_index (image k's grid is its image_grid_thw); None for
        other models. Called once per request, by the core."""
        if self.model_type not in MROPE_TYPES or not images:
            return None
        ids = torch.tensor([input_ids], dtype=torch.long)
        types = torch.zeros_like(ids, dtype=torch.int)  # mm_token_type_ids: 1 at image positions
        for image in images:
            types[0, image["offset"] : image["offset"] + image["length"]] = 1
        grids = torch.stack(self.check_image_grids(images))
        rows, delta = self._vision.get_rope_index(ids, types, image_grid_thw=grids)
        return rows[:, 0].tolist(), int(delta.reshape(-1)[0])

    def check_image_grids(self, images: list[dict[str, Any]]) -> list[torch.Tensor]:
        """M-RoPE models: each image's image_grid_thw [t, h, w], which must give as many merged patches as
        the image has placeholder tokens (a ValueError naming the image otherwise). [] for other models."""
        if self.model_type not in MROPE_TYPES:
            return []
        merge = int(self.hf.config.vision_config.spatial_merge_size)
        grids = []
        for k, image in enumerate(images):
            spec = image["tensors"].get("image_grid_thw")
            if spec is None:
                raise ValueError(
                    f"AddRequest.images[{k}]: {self.model_type} needs the processor's image_grid_thw"
                )
            grid = tensor_from_wire(spec, f"images[{k}].image_grid_thw").reshape(-1)
            if grid.numel() != 3 or int(grid.prod()) // merge**2 != image["length"]:
                raise ValueError(
                    f"AddRequest.images[{k}]: image_grid_thw {grid.tolist()} does not give its "
                    f"{image['length']} placeholder tokens (t*h*w / {merge}^2)"
                )
            grids.append(grid)
        return grids

    def _embed(self, input_ids: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        emb = self.hf.get_input_embeddings()
        if not fb.span_images:
            return emb(input_ids)
        vocab = emb.weight.shape[0]
        embeds = emb(torch.where(input_ids >= vocab, 0, input_ids))
        # A loop over the images of the step's spans (a few), never over tokens.
        for packed, start, length, images in fb.span_images:
            end = start + length
            for image in images:
                off, n = image["offset"], image["length"]
                a, b = max(off, start), min(off + n, end)
                if a >= b:
                    continue
                feats = self._image_features(image)
                embeds[packed + a - start : packed + b - start] = feats[a - off : b - off].to(embeds.dtype)
        return embeds

    def _image_features(self, image: dict[str, Any]) -> torch.Tensor:
        """[placeholder tokens, hidden] for one image, from the model's own get_image_features."""
        key = image["hash"]
        cached = self._features.get(key)
        if cached is not None:
            self._features.move_to_end(key)
            return cached
        device = self.hf.get_input_embeddings().weight.device
        tensors = {name: tensor_from_wire(spec, name) for name, spec in image["tensors"].items()}
        if "pixel_values" not in tensors:
            raise ValueError("an image reached the model without pixel_values")
        kwargs = {
            name: t.to(device, self._dtype if t.is_floating_point() else t.dtype)
            for name, t in tensors.items()
        }
        out = self._vision.get_image_features(**kwargs, return_dict=True)
        self.vision_runs += 1
        pooled = out.pooler_output
        feats = torch.cat(list(pooled), dim=0) if isinstance(pooled, (list, tuple)) else pooled
        feats = feats.reshape(-1, feats.shape[-1])
        if feats.shape[0] != image["length"]:
            raise ValueError(
                f"{type(self.hf).__name__}: the image has {image['length']} placeholder tokens but the vision "
                f"tower made {feats.shape[0]} features"
            )
        self._features[key] = feats
        while len(self._features) > IMAGE_FEATURE_CACHE:
            self._features.popitem(last=False)
        return feats
