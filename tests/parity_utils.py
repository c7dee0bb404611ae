"""The parity helpers live in radixlm.testing.parity (the census uses them too); tests import them here."""

from radixlm.testing.parity import (
    TIE_MARGIN,
    assert_greedy_match,
    drive_core,
    greedy_mismatch,
    hf_greedy,
    hf_model,
    random_prompts,
)

_hf_model = hf_model  # the name older tests use

__all__ = [
    "TIE_MARGIN",
    "_hf_model",
    "assert_greedy_match",
    "drive_core",
    "greedy_mismatch",
    "hf_greedy",
    "hf_model",
    "random_prompts",
]
