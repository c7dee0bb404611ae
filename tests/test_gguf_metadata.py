"""radixlm.gguf_metadata: a GGUF file's config is read from its metadata once, kept as a folder, and read
again when the file changes; a part that fails to load leaves nothing behind."""

from __future__ import annotations

import os

import pytest

from radixlm import gguf_metadata
from radixlm.testing import cached_model_folder

pytest.importorskip("gguf")


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    from tests.model.test_gguf_written import _write_gguf

    monkeypatch.setenv("RADIXLM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "tiny-llama.gguf"
    _write_gguf(cached_model_folder("llama", "tiny"), out, "llama")
    return out


def _count_gguf_reads(monkeypatch, cls) -> list[str]:
    """Calls of cls.from_pretrained that parse a GGUF file (gguf_file=...)."""
    calls: list[str] = []
    real = cls.from_pretrained.__func__

    def counting(klass, *args, **kwargs):
        if kwargs.get("gguf_file"):
            calls.append(kwargs["gguf_file"])
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(counting))
    return calls


def test_the_config_is_parsed_once_and_again_when_the_file_changes(tiny_gguf, monkeypatch) -> None:
    from transformers import AutoConfig

    direct = AutoConfig.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).to_dict()
    calls = _count_gguf_reads(monkeypatch, AutoConfig)
    first = gguf_metadata.load_config(tiny_gguf)
    second = gguf_metadata.load_config(tiny_gguf)
    assert len(calls) == 1
    for cfg in (first, second):
        got = cfg.to_dict()
        assert {k: v for k, v in got.items() if k != "_name_or_path"} == {
            k: v for k, v in direct.items() if k != "_name_or_path"
        }
    folder = gguf_metadata.metadata_folder(tiny_gguf, "config")
    st = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    gguf_metadata.load_config(tiny_gguf)
    assert len(calls) == 2, "a changed file must be read again"
    assert gguf_metadata.metadata_folder(tiny_gguf, "config") != folder


def test_a_file_without_a_tokenizer_fails_and_leaves_no_partial_part(tiny_gguf) -> None:
    with pytest.raises(ValueError, match="tokenizer"):  # transformers: the metadata has no tokenizer
        gguf_metadata.load_tokenizer(tiny_gguf)
    folder = gguf_metadata._folder(tiny_gguf.resolve())
    assert not (folder / ".tokenizer-complete").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".tokenizer-")]
    assert gguf_metadata.load_config(tiny_gguf).model_type == "llama"  # the other part still works
