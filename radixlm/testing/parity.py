"""Comparing radixlm's greedy output with transformers' generate (the oracle): for the tests and the census."""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import torch

from radixlm.messages import AddRequest

TIE_MARGIN = 1e-3  # DESIGN.md: a step where transformers' own top-2 margin is below this is a tie


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


@lru_cache(maxsize=8)
def hf_model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.generation_config.eos_token_id = None  # generate() would fill a missing EOS from here
    return model.eval()


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int, dtype: torch.dtype = torch.float32):
    """transformers' greedy continuation and its per-step top-2 logit margins."""
    return greedy_with_margins(hf_model(str(path), dtype), prompt, max_new_tokens)


def greedy_with_margins(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """A loaded transformers model's greedy continuation and its per-step top-2 logit margins."""
    from transformers import GenerationConfig

    # No EOS at all (radixlm runs with ignore_eos): min_new_tokens would instead *ban* EOS and change the argmax.
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            generation_config=gen,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    margins = []
    for logits in out.logits:
        top2 = torch.topk(logits[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    return tokens, margins


def greedy_mismatch(ours: list[int], ref: list[int], margins: list[float], label: str = "") -> str | None:
    """None when token-identical, except that the comparison ends at a tie step (where either choice is
    right); else what differs."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            if margins[i] < TIE_MARGIN:
                return None
            return (
                f"{label}: token {i} differs: radixlm {a} vs transformers {b} (margin {margins[i]:.4f}); "
                f"radixlm {ours} vs transformers {ref}"
            )
    if len(ours) != len(ref):
        return f"{label}: radixlm produced {len(ours)} tokens, transformers {len(ref)}"
    return None


def assert_greedy_match(ours: list[int], ref: list[int], margins: list[float], label: str = "") -> None:
    why = greedy_mismatch(ours, ref, margins, label)
    if why is not None:
        raise AssertionError(why)


def drive_core(core, prompts: list[list[int]], params: dict, stagger: int = 0) -> dict[str, list]:
    """Add prompts (one every `stagger` steps, or all at once) and step until done.

    KV accounting is checked after every step and no request may be aborted. Returns per prompt, in order,
    the generated ids ("ids") and the cached_tokens reported ("cached").
    """
    outs: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or core.has_work():
        if pending and (stagger == 0 or step % stagger == 0):
            take = pending if stagger == 0 else pending[:1]
            for i, p in take:
                core.add_request(AddRequest([f"r{i}"], p, params))
            pending = pending[len(take) :]
        for o in core.step():
            assert o.finish_reason is None or not o.finish_reason.is_abort, o.finish_reason
            outs.setdefault(o.rid, []).extend(o.new_token_ids)
            cached[o.rid] = o.cached_tokens
        core.check()
        step += 1
    return {
        "ids": [outs[f"r{i}"] for i in range(len(prompts))],
        "cached": [cached[f"r{i}"] for i in range(len(prompts))],
    }
