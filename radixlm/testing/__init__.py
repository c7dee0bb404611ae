"""Offline model folders for tests, benchmarks and demos: nothing here downloads anything.

    from radixlm.testing import make_model_folder, cached_model_folder, ARCHITECTURES, SIZES
    path = cached_model_folder("qwen2")          # tiny, seed 0, built once per machine
    make_model_folder("llama", "0.5b", "/tmp/llama-0.5b")

See model_folders.py for why and how.
"""

from radixlm.testing.model_folders import (
    ARCHITECTURES,
    FORMAT_VERSION,
    REQUIRED_ARCHITECTURES,
    SIZES,
    cache_root,
    cached_model_folder,
    make_config,
    make_model_folder,
)

__all__ = [
    "ARCHITECTURES",
    "FORMAT_VERSION",
    "REQUIRED_ARCHITECTURES",
    "SIZES",
    "cache_root",
    "cached_model_folder",
    "make_config",
    "make_model_folder",
]
