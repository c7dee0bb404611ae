"""`select` against transformers: the chosen choice has the highest mean token logprob as transformers'
own logits give it (float32, the tiny random-weight folders), and each choice's score matches."""

from __future__ import annotations

import pytest
import torch

from radixlm import Engine
from radixlm import lang as sgl
from radixlm.testing import cached_model_folder
from tests.parity_utils import _hf_model

PREFIXES = ["The best color is ", "Q: Which season is the coldest?\nA:", "My friend works at the"]
CHOICES = [" winter", " summer", "a small house by the river", "music", "paper money"]


def _hf_scores(path: str, tokenizer, prefix: str, choices: list[str]) -> list[float]:
    model = _hf_model(path, torch.float32)
    prefix_ids = tokenizer.encode(prefix)
    scores = []
    for c in choices:
        ids = tokenizer.encode(prefix + c)
        start = next((i for i, (a, b) in enumerate(zip(prefix_ids, ids)) if a != b), len(prefix_ids))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = [logprobs[i - 1, ids[i]].item() for i in range(start, len(ids))]
        scores.append(sum(picked) / len(picked))
    return scores


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_select_matches_transformers(arch: str) -> None:
    path = str(cached_model_folder(arch))
    with Engine(model_path=path, dtype="float32", inline_core=True, log_level="warning") as llm:
        tokenizer = llm.tokenizer_manager.tokenizer
        for prefix in PREFIXES:

            @sgl.function
            def pick(s, prefix=prefix):
                s += prefix + sgl.select("x", choices=CHOICES)

            st = pick.run(backend=llm)
            ours = st.get_meta_info("x")["normalized_prompt_logprobs"]
            theirs = _hf_scores(path, tokenizer, prefix, CHOICES)
            assert ours == pytest.approx(theirs, abs=1e-4)
            best = max(range(len(CHOICES)), key=theirs.__getitem__)
            runner_up = sorted(theirs)[-2]
            if theirs[best] - runner_up > 1e-3:  # closer than that is a tie, not a failure
                assert st["x"] == CHOICES[best]
