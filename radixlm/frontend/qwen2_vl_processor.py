"""Qwen2-VL's processor without its video processor.

transformers' Qwen2VLProcessor takes an image processor, a tokenizer and a video processor, and its video
processor needs torchvision, which radixlm does not depend on: without it AutoProcessor cannot load a
Qwen2-VL folder at all. radixlm sends images only, so this subclass keeps transformers' own image path
(the same image processor, the same placeholder expansion, the same mm_token_type_ids) and has no video
processor; a video reaching it fails in transformers' own code, by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# model_type -> the transformers processor class the image-only variant derives from
IMAGE_ONLY_PROCESSOR_TYPES = ("qwen2_vl",)


def image_only_processor(model_path: str | Path, model_type: str, *, trust_remote_code: bool = False) -> Any:
    """The model's processor with its image processor and tokenizer only (Qwen2-VL)."""
    if model_type not in IMAGE_ONLY_PROCESSOR_TYPES:
        raise ValueError(f"no image-only processor for model type {model_type!r}")
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        # ProcessorMixin reads its sub-processors from __init__'s parameters: no video_processor here.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
