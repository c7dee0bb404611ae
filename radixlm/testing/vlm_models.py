"""Tiny vision-language model folders with random weights and their processors, written locally.

Each folder is what a Hub VLM folder holds: config.json (the composite config: vision + text), the
weights saved by the real transformers class, the tokenizer (our locally trained BPE plus the model's
image tokens) and the processor (image processor + tokenizer + chat template) saved with
`save_pretrained`, so `AutoProcessor.from_pretrained(folder)` and `radixlm` load it as they would a real
one. No downloads.

    llava    CLIP vision tower (32x32 images, 8x8 patches -> 16 image tokens), Llama text model
    gemma3   SigLIP vision tower (32x32, 8x8 patches, pooled to 4 image tokens), Gemma 3 text model with
             sliding and full layers (image tokens attend bidirectionally inside their image)
    qwen2_vl Qwen2-VL vision tower (patches of 14 merged 2x2: a 32x32 image is resized to 56x56, 4 image
             tokens on a 2x2 grid; 64x32 -> 84x56, 6 tokens on 2x3), Qwen2 text model with M-RoPE; its
             processor is saved without a video processor (frontend/qwen2_vl_processor.py)

`random_image(seed)` gives a PIL image from a seeded numpy array.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import uuid
import zlib

import torch

from radixlm.testing import tokenizer as _tok
from radixlm.testing.model_folders import cache_root

VLM_ARCHITECTURES: tuple[str, ...] = ("llava", "gemma3", "qwen2_vl")
FORMAT_VERSION = 2
IMAGE_SIZE = 32
LOGIT_STD = 4.0  # the final norm is scaled so that logits are this sharp (flat random logits tie)

# ChatML with OpenAI-style content parts: an image part renders as the model's image placeholder, which
# the processor then expands to the image's tokens.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ('image', 'image_url') -%}{{- '@IMAGE@' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def random_image(seed: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)):
    """An RGB PIL image of seeded uniform noise (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def _tokenizer(out: pathlib.Path, extra: list[str], extra_named: dict[str, str] | None = None):
    """Our BPE tokenizer with the model's image tokens added as special tokens."""
    from transformers import PreTrainedTokenizerFast

    _tok.write_tokenizer(out, vocab_size=_tok.tokenizer_vocab_size(), model_max_length=512)
    if extra_named:  # named special tokens (tokenizer.boi_token, .boi_token_id), saved with the tokenizer
        return PreTrainedTokenizerFast.from_pretrained(out, extra_special_tokens=extra_named)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def _text_kwargs() -> dict:
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "bos_token_id": _tok.ENDOFTEXT_ID,
        "eos_token_id": _tok.IM_END_ID,
        "pad_token_id": _tok.ENDOFTEXT_ID,
    }


def _vision_kwargs() -> dict:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }


def _build_llava(out: pathlib.Path):
    import transformers as tf

    tok = _tokenizer(out, ["<image>"])
    image_id = tok.convert_tokens_to_ids("<image>")
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_vision_kwargs(), projection_dim=32),
        text_config=tf.LlamaConfig(**_text_kwargs(), vocab_size=len(tok)),
        image_token_id=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        architectures=["LlavaForConditionalGeneration"],
    )
    image_processor = tf.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which the "default" strategy drops
        image_token="<image>",
        chat_template=_CHAT_TEMPLATE.replace("@IMAGE@", "<image>"),
    )
    return config, processor, tf.LlavaForConditionalGeneration


def _build_gemma3(out: pathlib.Path):
    import transformers as tf

    named = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tok = _tokenizer(out, list(named.values()), named)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in named.items()}
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    text = tf.Gemma3TextConfig(
        **_text_kwargs(),
        vocab_size=len(tok),
        sliding_window=8,  # shorter than an image prompt: sliding layers' windows meet the image block
        layer_types=layer_types,
        query_pre_attn_scalar=32,
        tie_word_embeddings=True,
    )
    config = tf.Gemma3Config(
        vision_config=tf.SiglipVisionConfig(**_vision_kwargs()),
        text_config=text,
        mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
        architectures=["Gemma3ForConditionalGeneration"],
    )
    image_processor = tf.Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False
    )
    processor = tf.Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=4,
        chat_template=_CHAT_TEMPLATE.replace("@IMAGE@", "<start_of_image>"),
    )
    return config, processor, tf.Gemma3ForConditionalGeneration


class _SavedAlready:
    """The processor's parts were written by the builder (Qwen2-VL: no video processor to save)."""

    def save_pretrained(self, out) -> None:
        pass


def _build_qwen2_vl(out: pathlib.Path):
    import transformers as tf

    named = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(out, named)
    ids = {t: tok.convert_tokens_to_ids(t) for t in named}
    text = {**_text_kwargs(), "vocab_size": len(tok)}
    text.pop("head_dim")  # Qwen2's head_dim is hidden_size / heads = 16: mrope_section sums to 8
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = tf.Qwen2VLConfig(
        text_config=tf.Qwen2VLTextConfig(**text, rope_parameters=rope),
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        architectures=["Qwen2VLForConditionalGeneration"],
    )
    tf.Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=56 * 112
    ).save_pretrained(out)
    tok.chat_template = _CHAT_TEMPLATE.replace("@IMAGE@", "<|vision_start|><|image_pad|><|vision_end|>")
    tok.save_pretrained(out)
    return config, _SavedAlready(), tf.Qwen2VLForConditionalGeneration


_BUILDERS = {"llava": _build_llava, "gemma3": _build_gemma3, "qwen2_vl": _build_qwen2_vl}


@torch.no_grad()
def _sharpen(model: torch.nn.Module, seed: int) -> None:
    """Random-sign scale on the language model's final norm, so greedy logits are not near-ties."""
    lm = model.model.language_model
    gen = torch.Generator().manual_seed(seed + 7)
    # Matrices transformers initialises to zeros (Gemma 3's mm_input_projection_weight) would make every
    # image feature zero, and a test then could not tell an image from another or see its attention mask.
    for _, p in model.named_parameters():
        if p.ndim >= 2 and not p.any():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ids = (torch.arange(48) * 37 + 11) % 2000
    logits = model(input_ids=ids[None], use_cache=False).logits.float()
    scale = float(f"{LOGIT_STD / logits[0, 8:].std(dim=-1).mean().item():.2g}")
    w = lm.norm.weight
    signs = torch.randint(0, 2, w.shape, generator=gen).mul_(2).sub_(1).float()
    zero_centred = bool(getattr(model.config.get_text_config(), "model_type", "") == "gemma3_text")
    if zero_centred:  # Gemma: output * (1 + w)
        w.copy_((1.0 + w.float()) * signs * scale - 1.0)
    else:
        w.copy_(w.float() * signs * scale)


def make_vlm_folder(arch: str, out: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Write a tiny float32 VLM folder (config, weights, tokenizer, processor) for `arch` into `out`."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown VLM architecture {arch!r}; valid: {', '.join(VLM_ARCHITECTURES)}")
    from transformers import GenerationConfig

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config, processor, cls = _BUILDERS[arch](out)
    init_seed = zlib.crc32(f"vlm-{arch}:{seed}".encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = cls(config).eval()
    _sharpen(model, init_seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    GenerationConfig(
        bos_token_id=_tok.ENDOFTEXT_ID, eos_token_id=[_tok.IM_END_ID], pad_token_id=_tok.ENDOFTEXT_ID
    ).save_pretrained(out)
    meta = {
        "generator": "radixlm.testing.make_vlm_folder",
        "arch": arch,
        "seed": seed,
        "format_version": FORMAT_VERSION,
    }
    (out / "radixlm_testing.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def cached_vlm_folder(arch: str, *, seed: int = 0) -> pathlib.Path:
    """make_vlm_folder's output, built once under the test-model cache and then reused (atomic rename)."""
    root = cache_root()
    final = root / f"vlm-{arch}-s{seed}-v{FORMAT_VERSION}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=uuid.uuid4().hex[:8], dir=root))
    try:
        make_vlm_folder(arch, tmp, seed=seed)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
