"""Images in the front: loading them, the model's own processor, and what travels to the core.

image_data: a path ("/x.png" or "file:///x.png"), a data URL ("data:image/png;base64,..."), raw bytes,
            a PIL image, or a list of those for one prompt; one entry (or list) per prompt.
            http(s) URLs are fetched only with EngineConfig.allow_image_urls (--allow-image-urls).
processor:  AutoProcessor from the model folder (image processor + tokenizer + chat template); it
            expands each image placeholder to the image's tokens and makes its pixel values.
-> per prompt: the processor's token ids and one messages.AddRequest.images entry per image: where its
   placeholder tokens are, a hash of its pixel values (the prefix cache keys the image by it, so the same
   image shares a cached prefix and different images never do), and its tensors as [dtype, shape, raw
   bytes] (messages.py carries no torch).
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

IMAGE_URL_TIMEOUT_S = 10.0
MAX_IMAGE_BYTES = 32 * 2**20  # an image read from a URL or data URL larger than this is refused
# Processor outputs that are per-token, not per-image: they stay with the prompt.
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def load_image(source: Any, *, allow_urls: bool = False, what: str = "image_data"):
    """One image source -> an RGB PIL image; a ValueError naming `what` when it cannot be read."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray)):
        return _open(bytes(source), what)
    if isinstance(source, dict) and "url" in source:  # an OpenAI image_url object
        source = source["url"]
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"{what}: expected a path, a data URL, bytes or a PIL image, got {type(source).__name__}"
        )
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ValueError(f"{what}: a data URL must be base64 (data:image/...;base64,...)")
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise ValueError(f"{what}: the data URL is over {MAX_IMAGE_BYTES} bytes")
        try:
            return _open(base64.b64decode(payload, validate=True), what)
        except ValueError as exc:
            raise ValueError(f"{what}: the data URL is not valid base64 ({exc})") from None
    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme in ("http", "https"):
        if not allow_urls:
            raise ValueError(
                f"{what}: image URLs are not fetched unless the engine allows it (--allow-image-urls); "
                "send a data URL or a local path"
            )
        with urllib.request.urlopen(source, timeout=IMAGE_URL_TIMEOUT_S) as resp:  # noqa: S310 (allowed by flag)
            return _open(resp.read(MAX_IMAGE_BYTES + 1), what)
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(source).path) if scheme == "file" else source)
    if scheme not in ("", "file") and len(scheme) > 1:  # "c:" is a Windows drive, not a scheme
        raise ValueError(f"{what}: unsupported image URL scheme {scheme!r} (use a data URL or a local path)")
    if not path.is_file():
        raise ValueError(f"{what}: no image file at {str(path)!r}")
    return _open(path.read_bytes(), what)


def _open(data: bytes, what: str):
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{what}: the image is over {MAX_IMAGE_BYTES} bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{what}: not a readable image ({exc})") from None
    return image.convert("RGB")


def tensor_to_wire(t) -> list[Any]:
    """A tensor -> [dtype, shape, raw bytes] (model/transformers_backend/multimodal.tensor_from_wire)."""
    t = t.detach().cpu().contiguous()
    return [str(t.dtype).removeprefix("torch."), list(t.shape), t.numpy().tobytes()]


def image_hash(tensors: dict[str, list[Any]]) -> int:
    """A 63-bit hash of an image's processed tensors (what the model sees, not the file's bytes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        h.update(f"{name}:{dtype}:{shape}:".encode())
        h.update(raw)
    return int.from_bytes(h.digest()[:8], "little") >> 1


def placeholder_runs(ids: list[int], image_token_id: int, num_images: int) -> list[tuple[int, int]]:
    """Each image's (offset, length) of placeholder tokens: one contiguous run per image, or, when
    images sit side by side with nothing between them, the runs split evenly."""
    runs: list[list[int]] = []
    for i, t in enumerate(ids):
        if t == image_token_id:
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1][1] += 1
            else:
                runs.append([i, 1])
    if len(runs) == num_images:
        return [(a, n) for a, n in runs]
    total = sum(n for _, n in runs)
    if num_images and total % num_images == 0 and len(runs) < num_images:
        per = total // num_images
        out = []
        for a, n in runs:
            out.extend((a + k * per, per) for k in range(n // per))
        if len(out) == num_images:
            return out
    raise ValueError(
        f"image_data: {num_images} image(s) but the processed prompt has {len(runs)} image placeholder run(s) "
        f"of token {image_token_id}"
    )


class ImageProcessor:
    """The model's processor in the front process, loaded once; thread-safe (processing runs on the
    tokenizer's worker threads)."""

    def __init__(
        self, model_path: str | Path, *, trust_remote_code: bool = False, allow_urls: bool = False
    ) -> None:
        from transformers import AutoConfig, AutoProcessor

        from radixlm.frontend.qwen2_vl_processor import IMAGE_ONLY_PROCESSOR_TYPES, image_only_processor

        self.allow_urls = allow_urls
        config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
        model_type = getattr(config, "model_type", None)
        try:
            if model_type in IMAGE_ONLY_PROCESSOR_TYPES:  # its video processor would need torchvision
                self.processor = image_only_processor(
                    model_path, model_type, trust_remote_code=trust_remote_code
                )
            else:
                self.processor = AutoProcessor.from_pretrained(
                    str(model_path), trust_remote_code=trust_remote_code
                )
        except Exception as exc:  # noqa: BLE001 (many loaders, many error types)
            raise ValueError(
                f"the model at {model_path} has no loadable processor for images: {exc}"
            ) from exc
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_index", None)
        if image_token_id is None or getattr(self.processor, "image_processor", None) is None:
            raise ValueError(f"the model at {model_path} has no image token or image processor")
        self.image_token_id = int(image_token_id)
        self.image_token = str(self.processor.image_token)  # what a prompt writes where an image goes
        self._lock = threading.Lock()

    def render_chat(
        self, conversation: list[dict[str, Any]], template_kwargs: dict[str, Any] | None = None
    ) -> str:
        """The conversation through the processor's chat template (image parts become placeholders)."""
        with self._lock:
            return self.processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
            )

    def process(self, text: str, images: list[Any]) -> tuple[list[int], list[dict[str, Any]]]:
        """A prompt's text and its images -> the processor's token ids and the AddRequest.images entries.
        A prompt without placeholders gets one per image in front (SGLang does the same)."""
        pil = [
            load_image(x, allow_urls=self.allow_urls, what=f"image_data[{i}]") for i, x in enumerate(images)
        ]
        if pil and self.image_token not in text:
            text = self.image_token * len(pil) + text
        elif text.count(self.image_token) != len(pil):
            raise ValueError(
                f"image_data: {len(pil)} image(s) but the prompt has {text.count(self.image_token)} "
                f"{self.image_token!r} placeholder(s)"
            )
        with self._lock:
            out = self.processor(text=text, images=pil or None, return_tensors="pt")
        if not pil:
            return out["input_ids"][0].tolist(), []
        ids = out["input_ids"][0].tolist()
        runs = placeholder_runs(ids, self.image_token_id, len(pil))
        # Qwen2-VL packs all images' patches into one pixel_values: image k has image_grid_thw[k]'s product.
        grid = out.get("image_grid_thw")
        patch_rows = grid.prod(-1).tolist() if grid is not None else None
        entries = []
        for k, (offset, length) in enumerate(runs):
            tensors = {}
            for name, value in out.items():
                if name in _TEXT_KEYS or not hasattr(value, "shape"):
                    continue
                if patch_rows is not None and name == "pixel_values" and value.shape[0] == sum(patch_rows):
                    first = sum(patch_rows[:k])
                    tensors[name] = tensor_to_wire(value[first : first + patch_rows[k]])
                    continue
                if value.shape[0] != len(pil):
                    raise ValueError(
                        f"the processor's {name!r} has {value.shape[0]} rows for {len(pil)} images; radixlm "
                        "splits image tensors one row per image"
                    )
                tensors[name] = tensor_to_wire(value[k : k + 1])
            entries.append(
                {
                    "offset": offset,
                    "length": length,
                    "hash": image_hash(tensors),
                    "tensors": tensors,
                }
            )
        return ids, entries


def normalize_image_data(image_data: Any, num_prompts: int) -> list[list[Any]]:
    """image_data -> one list of image sources per prompt (a single prompt may give one source or a list)."""
    if num_prompts == 1 and not isinstance(image_data, list):
        return [[image_data]]
    if num_prompts == 1 and isinstance(image_data, list) and not any(isinstance(x, list) for x in image_data):
        return [list(image_data)]
    if not isinstance(image_data, list) or len(image_data) != num_prompts:
        raise ValueError(
            f"image_data must have one entry (an image or a list of images) per prompt ({num_prompts})"
        )
    return [list(x) if isinstance(x, list) else ([] if x is None else [x]) for x in image_data]


def prepare_with_images(prepare: Any, image_data: Any, processor: ImageProcessor | None) -> Any:
    """A generate call with image_data: `prepare` is the call's functools.partial of inputs.prepare_call
    (prompt and input_ids first); the prompts go through the processor, and the checked call comes back
    with each prompt's images on its group."""
    import dataclasses

    prompt, input_ids = prepare.args[0], prepare.args[1]
    if processor is None:
        raise ValueError("image_data: this model takes no images (it is not a vision-language model)")
    if input_ids is not None or prompt is None:
        raise ValueError(
            "image_data needs the prompt as text (prompt=...): the processor places the image tokens"
        )
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a list of strings")
    per_prompt = normalize_image_data(image_data, len(prompts))
    processed = [processor.process(text, images) for text, images in zip(prompts, per_prompt)]
    ids = [p[0] for p in processed]
    call = prepare.func(
        None, ids[0] if isinstance(prompt, str) else ids, *prepare.args[2:], **prepare.keywords
    )
    groups = [dataclasses.replace(g, images=processed[g.index][1]) for g in call.groups]
    return dataclasses.replace(call, groups=groups)


def chat_images(conversation: list[dict[str, Any]]) -> list[Any]:
    """The image sources of a conversation's OpenAI-style content parts, in order."""
    found = []
    for message in conversation:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    found.append(part.get("image_url"))
                elif isinstance(part, dict) and part.get("type") == "image":
                    found.append(part.get("image") or part.get("url"))
    return found
