"""Times one decode step of N streaming requests: the per-request rule (two `tokenizer.decode` calls per
request) against one `BatchDetokenizer.step`. Not a test; the figures quoted in tokenizer_manager.py:

    python -m tests.frontend.detok_timing [N ...]
"""

from __future__ import annotations

import sys
import time

from transformers import AutoTokenizer

from radixlm.frontend.tokenizer_manager import BatchDetokenizer, DetokState
from radixlm.sampling_params import SamplingParams
from radixlm.testing import cached_model_folder
from tests.frontend.test_detokenizer import TEXTS, ReferenceDetokenizer

STEPS = 40  # decode steps timed per round: each request gets one token per step
ROUNDS = 5  # best of


def _time(fn) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / STEPS


def _per_request(tokenizer, params: SamplingParams, outputs: list[list[int]]) -> None:
    refs = [ReferenceDetokenizer(tokenizer, params) for _ in outputs]
    for step in range(STEPS):
        for ref, out in zip(refs, outputs):
            ref.add([out[step]])
            ref.take_delta(False, None)


def _batched(detok: BatchDetokenizer, params: SamplingParams, outputs: list[list[int]]) -> None:
    states = [DetokState(params) for _ in outputs]
    for step in range(STEPS):
        for st, out in zip(states, outputs):
            st.ids.append(out[step])
        detok.step(states, [])


def main(sizes: list[int]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(cached_model_folder("qwen2")))
    detok = BatchDetokenizer(tokenizer)
    ids = tokenizer.encode(" ".join(TEXTS) * 4, add_special_tokens=False)
    params = SamplingParams()
    for n in sizes:
        outputs = [ids[i % 50 : i % 50 + STEPS] for i in range(n)]
        old = _time(lambda outputs=outputs: _per_request(tokenizer, params, outputs))
        new = _time(lambda outputs=outputs: _batched(detok, params, outputs))
        print(
            f"{n} requests, one step: per-request decode {old * 1e6:.0f} us, batched {new * 1e6:.0f} us, "
            f"{old / new:.1f}x"
        )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [64, 256])
