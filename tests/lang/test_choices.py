"""The select methods on hand-made scores (no engine)."""

from __future__ import annotations

import pytest

from radixlm import lang as sgl
from radixlm.lang.choices import ChoiceScores


def _scores(*rows: list[float], uncond: list[list[float | None]] | None = None) -> ChoiceScores:
    choices = [f"c{i}" for i in range(len(rows))]
    scored = [[(lp, 7) for lp in row] for row in rows]
    unc = None if uncond is None else [[(lp, 7) for lp in row] for row in uncond]
    return ChoiceScores(choices, scored, unc)


def test_token_length_normalized_prefers_the_best_mean() -> None:
    # c0 has the best total (-2.0) but the worse mean; c1's mean is -1.5 > -2.0.
    d = sgl.token_length_normalized(_scores([-2.0], [-1.0, -2.0]))
    assert d.decision == "c1"
    assert d.meta_info["normalized_prompt_logprobs"] == [-2.0, -1.5]


def test_ties_go_to_the_first_choice() -> None:
    assert sgl.token_length_normalized(_scores([-1.0], [-1.0])).decision == "c0"


def test_greedy_token_selection_compares_left_to_right() -> None:
    # Same first token; the second decides, though c0's mean is better.
    d = sgl.greedy_token_selection(_scores([-1.0, -3.0, 0.0], [-1.0, -2.0, -9.0]))
    assert d.decision == "c1"
    # A shorter choice is padded with its own mean: c0 = [-1, -1], c1 = [-1, -1.5].
    assert sgl.greedy_token_selection(_scores([-1.0], [-1.0, -1.5])).decision == "c0"


def test_unconditional_normalization_removes_the_prior() -> None:
    # c0 is likelier given the prefix, but much likelier without it too: c1 gains more from the prefix.
    d = sgl.unconditional_likelihood_normalized(_scores([-1.0], [-2.0], uncond=[[None], [-5.0]]))
    assert d.decision == "c1"
    assert d.meta_info["normalized_unconditional_prompt_logprobs"] == [-1.0, 3.0]
    with pytest.raises(ValueError, match="unconditional"):
        sgl.unconditional_likelihood_normalized(_scores([-1.0]))
