"""The transformers baselines run on every transformers the project supports (pyproject: >=5.17)."""

from dataclasses import dataclass, fields

from transformers import ContinuousBatchingConfig

from radixlm.bench.hf_baselines import _page_field


@dataclass
class _ConfigBefore525:  # transformers 5.17's spelling (the CUDA image's version)
    block_size: int = 256
    num_blocks: int | None = None


@dataclass
class _ConfigSince525:
    page_size: int = 256
    num_blocks: int | None = None


def test_page_size_goes_to_the_field_this_transformers_has() -> None:
    assert _page_field(_ConfigBefore525) == "block_size"
    assert _page_field(_ConfigSince525) == "page_size"
    installed = {f.name for f in fields(ContinuousBatchingConfig)}
    assert _page_field(ContinuousBatchingConfig) in installed
