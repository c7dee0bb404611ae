"""A GGUF file's config and tokenizer, read from its metadata once and kept as a plain Hugging Face folder.

transformers builds both from a GGUF file's metadata (`gguf_file=`), but each call parses every metadata
field again: for SmolLM2's 49k-token vocabulary that is several seconds per call, and an engine makes
three or four of them (the front's tokenizer, the core's config, the stop-string and grammar tokenizers).
The first call here saves what transformers derived (`save_pretrained` of the config and the tokenizer,
chat template included) under `$RADIXLM_CACHE_DIR/gguf/` (default `~/.cache/radixlm/gguf/`), keyed by
the file's resolved path, size and modification time and by the transformers version; later calls, in any
process, load that folder instead. The config and the tokenizer are written apart (a file may hold no
tokenizer), each file renamed into place whole and a marker written last, so a reader never takes half a
part, and two processes racing to write one write the same bytes.

A leaf: no torch, no other radixlm module; transformers is imported only inside the functions.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

GGUF_SUFFIX = ".gguf"
_LAYOUT = 1  # bump when what is saved changes


def is_gguf_path(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix.lower() == GGUF_SUFFIX and p.is_file()


def cache_root() -> Path:
    return Path(os.environ.get("RADIXLM_CACHE_DIR") or Path.home() / ".cache" / "radixlm") / "gguf"


def _folder(src: Path) -> Path:
    import transformers

    stat = src.stat()
    identity = f"{src}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{_LAYOUT}"
    return cache_root() / f"{src.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def metadata_folder(path: str | os.PathLike, part: str) -> Path:
    """The folder holding `path`'s "config" or "tokenizer" (each written on its first use: a file may have
    a config and no tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    src = Path(path).resolve()
    folder = _folder(src)
    marker = folder / f".{part}-complete"
    if marker.is_file():
        return folder
    loader = {"config": AutoConfig, "tokenizer": AutoTokenizer}[part]
    folder.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=folder))
    try:
        loader.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(partial)
        # Each file lands whole (a rename); the marker, written last, says the part is complete.
        for file in partial.iterdir():
            os.replace(file, folder / file.name)
        marker.write_text(f"{src}\n")
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def load_tokenizer(path: str | os.PathLike, **kwargs: Any) -> Any:
    """AutoTokenizer for a model folder, a Hub id, or a .gguf file (from its metadata folder)."""
    from transformers import AutoTokenizer

    source = metadata_folder(path, "tokenizer") if is_gguf_path(path) else path
    return AutoTokenizer.from_pretrained(str(source), **kwargs)


def load_config(path: str | os.PathLike, **kwargs: Any) -> Any:
    """AutoConfig for a .gguf file, from its metadata folder."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(metadata_folder(path, "config")), **kwargs)
