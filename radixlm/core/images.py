"""A vision-language prompt's images in the core: checked, turned into the prefix cache's key, and kept whole
inside a step when their tokens attend both ways. Plain ints and dicts: the scheduler's path imports no torch."""

from __future__ import annotations

from typing import Any

# Image positions are keyed above the vocabulary, so an image never matches text, and by the image's hash,
# so two requests share a cached prefix through an image only when it is the same image (SGLang's pad
# values). Within one image every position gets the same id: the key diverges where the images do.
IMAGE_KEY_RANGE = 1 << 40


def image_key_ids(input_ids: list[int], images: list[dict[str, Any]], vocab_size: int) -> list[int]:
    """The prompt as the prefix cache keys it: each image's placeholder positions replaced by an id
    derived from its hash (>= vocab_size). A new list; input_ids is not changed."""
    ids = list(input_ids)
    for image in images:
        key = vocab_size + image["hash"] % IMAGE_KEY_RANGE
        off, n = image["offset"], image["length"]
        ids[off : off + n] = [key] * n
    return ids


def fit_image_blocks(images: list[dict[str, Any]], start: int, n: int) -> int:
    """A span length from `start` that ends outside every bidirectional image block: such a block's first
    tokens attend to its last ones, so it cannot be cut across steps. A span that would end inside one
    ends before it, or, starting inside it (or at it), runs to its end (over the chunk budget if need be)."""
    end = start + n
    for image in images:
        if not image.get("bidirectional"):
            continue
        a, b = image["offset"], image["offset"] + image["length"]
        if a < end < b:
            end = a if a > start else b
    return end - start


def check_images(images: Any, input_ids: list[int], image_token_ids: set[int] | None) -> None:
    """AddRequest.images against its prompt: a TypeError / ValueError naming the field, before any state
    changes. image_token_ids: the ids the model's image placeholders may hold (None: the model takes no
    images)."""
    if not isinstance(images, list):
        raise TypeError("AddRequest.images must be a list")
    if not images:
        return
    if image_token_ids is None:
        raise ValueError("AddRequest.images: this model takes no images (it is not a vision-language model)")
    prev_end = 0
    for k, image in enumerate(images):
        if not isinstance(image, dict):
            raise TypeError(f"AddRequest.images[{k}] must be a map")
        off, n, h = image.get("offset"), image.get("length"), image.get("hash")
        if type(off) is not int or type(n) is not int or type(h) is not int or h < 0:
            raise TypeError(f"AddRequest.images[{k}] needs int offset, length and a non-negative int hash")
        if not isinstance(image.get("tensors"), dict) or not isinstance(
            image.get("bidirectional", False), bool
        ):
            raise TypeError(
                f"AddRequest.images[{k}] needs a tensors map (and bidirectional, if given, a bool)"
            )
        if n < 1 or off < prev_end or off + n > len(input_ids):
            raise ValueError(
                f"AddRequest.images[{k}] covers positions [{off}, {off + n}), which must be non-empty, in order, "
                f"not overlapping, and inside the prompt of {len(input_ids)} tokens"
            )
        if any(t not in image_token_ids for t in input_ids[off : off + n]):
            raise ValueError(f"AddRequest.images[{k}]: its positions must hold the model's image token")
        prev_end = off + n
