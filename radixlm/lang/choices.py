"""How `select` turns each choice's token logprobs into a decision.

Each method gets, per choice, the logprobs of the tokens that spell the choice after the prefix (the
`scored` lists), and picks one. The three are SGLang's (same names, same meaning), so a program that passes
`choices_method=sgl.greedy_token_selection` keeps its behaviour:

    token_length_normalized              mean logprob per token (the default: long choices are not
                                         punished for having more tokens)
    greedy_token_selection               compare token by token, left to right, keeping the choices tied
                                         for the best logprob so far; a choice that runs out of tokens is
                                         padded with its own mean
    unconditional_likelihood_normalized  mean of (logprob given the prefix - logprob without it): prefers
                                         choices the prefix makes likelier, not choices that are common
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChoiceScores:
    """What the backend measured for one select: per choice, [logprob, token id] of its scored tokens."""

    choices: list[str]
    scored: list[list[tuple[float, int]]]
    # Per choice, the same tokens scored with nothing before them (only for methods that ask for it).
    unconditional: list[list[tuple[float | None, int]]] | None = None

    def normalized(self) -> list[float]:
        return [sum(lp for lp, _ in toks) / len(toks) for toks in self.scored]


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] = field(default_factory=dict)


class ChoicesSamplingMethod:
    """A rule that picks one choice from its scores. Subclasses implement `decide`."""

    requires_unconditional_logprobs: bool = False

    def decide(self, scores: ChoiceScores) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def __call__(self, scores: ChoiceScores) -> ChoicesDecision:
        best, extra = self.decide(scores)
        meta = {
            "normalized_prompt_logprobs": scores.normalized(),
            "input_token_logprobs": [[[lp, tid] for lp, tid in toks] for toks in scores.scored],
            **extra,
        }
        return ChoicesDecision(scores.choices[best], meta)


def _argmax(values: list[float]) -> int:
    # The first of equal maxima: ties go to the earlier choice, deterministically.
    return max(range(len(values)), key=lambda i: (values[i], -i))


class TokenLengthNormalized(ChoicesSamplingMethod):
    def decide(self, scores: ChoiceScores) -> tuple[int, dict[str, Any]]:
        return _argmax(scores.normalized()), {}


class GreedyTokenSelection(ChoicesSamplingMethod):
    def decide(self, scores: ChoiceScores) -> tuple[int, dict[str, Any]]:
        width = max(len(toks) for toks in scores.scored)
        rows = []
        for toks in scores.scored:
            values = [lp for lp, _ in toks]
            mean = sum(values) / len(values)
            rows.append(values + [mean] * (width - len(values)))
        alive = list(range(len(rows)))
        for col in range(width):
            best = max(rows[i][col] for i in alive)
            alive = [i for i in alive if rows[i][col] == best]
            if len(alive) == 1:
                break
        return alive[0], {"greedy_logprob_matrix": rows}


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    requires_unconditional_logprobs = True

    def decide(self, scores: ChoiceScores) -> tuple[int, dict[str, Any]]:
        if scores.unconditional is None:
            raise ValueError("unconditional_likelihood_normalized needs the unconditional logprobs")
        values = []
        for cond, uncond in zip(scores.scored, scores.unconditional):
            # With nothing before it, a choice's first token has no logprob: it counts as 0.
            diffs = [c - (u or 0.0) for (c, _), (u, _) in zip(cond, uncond)]
            values.append(sum(diffs) / len(diffs))
        return _argmax(values), {
            "unconditional_token_logprobs": [[[lp, tid] for lp, tid in u] for u in scores.unconditional],
            "normalized_unconditional_prompt_logprobs": values,
        }


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
