"""`radixlm bench router`: data-parallel routing policies side by side on the shared-prefix workload.

    radixlm bench router --dp-size 2 --num-groups 8 --group-size 8

Each policy gets a fresh engine with --dp-size replicas; requests arrive in waves of --concurrency (in the
workload's shuffled order), so the router decides where each system prompt lives while others are still
running. Printed per policy: the prefix-cache hit rate (cached prompt tokens over all prompt tokens,
summed over replicas), output tokens per second, and the prompt tokens each replica was sent.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from radixlm.bench.workloads import load_token_pool, shared_prefix_requests
from radixlm.config import LOAD_BALANCE_METHODS, EngineConfig


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-groups", type=int, default=8, help="system prompts (default 8)")
    p.add_argument("--group-size", type=int, default=8, help="requests per system prompt (default 8)")
    p.add_argument("--prefix-len", type=int, default=512, help="shared tokens per group (default 512)")
    p.add_argument("--question-len", type=int, default=32, help="own tokens per request (default 32)")
    p.add_argument("--output-len", type=int, default=16, help="output tokens per request (default 16)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per wave (default 4)")


def run_router(config: EngineConfig, ns: argparse.Namespace) -> list[dict[str, Any]]:
    from radixlm import Engine

    if config.dp_size < 2:
        raise SystemExit("radixlm bench router: --dp-size must be at least 2")
    pool = load_token_pool(config.model_path)
    requests = shared_prefix_requests(
        pool, ns.num_groups, ns.group_size, ns.prefix_len, ns.question_len, ns.output_len, ns.seed
    )
    params = {"max_new_tokens": ns.output_len, "temperature": 0, "ignore_eos": True}
    rows = []
    for method in LOAD_BALANCE_METHODS:
        with Engine(**{**vars(config), "load_balance_method": method}) as llm:
            # Warm every replica up (first-call allocations, kernel choices), then start from empty caches.
            llm.generate(input_ids=[[1 + i] * 8 for i in range(2 * config.dp_size)], sampling_params=params)
            llm.flush_cache()
            start = time.perf_counter()
            outs = []
            for i in range(0, len(requests), ns.concurrency):
                wave = requests[i : i + ns.concurrency]
                outs += llm.generate(input_ids=[r.prompt_ids for r in wave], sampling_params=params)
            seconds = time.perf_counter() - start
            replicas = llm.get_server_info()["replicas"]
        prompt = sum(len(r.prompt_ids) for r in requests)
        rows.append(
            {
                "method": method,
                "hit_rate": sum(o["meta_info"]["cached_tokens"] for o in outs) / prompt,
                "output_tok_s": sum(len(o["output_ids"]) for o in outs) / seconds,
                "seconds": seconds,
                "prompt_tokens_per_replica": [r["total_prompt_tokens"] for r in replicas],
                "hit_rate_per_replica": [round(r["cache_hit_rate"], 3) for r in replicas],
            }
        )
    return rows


def print_rows(rows: list[dict[str, Any]], config: EngineConfig, ns: argparse.Namespace) -> None:
    print(
        f"== radixlm bench router: dp_size {config.dp_size}, {ns.num_groups} x {ns.group_size} requests, "
        f"prefix {ns.prefix_len} + {ns.question_len} tokens, {ns.output_len} out, waves of {ns.concurrency} =="
    )
    print(f"{'method':<12} {'hit rate':>9} {'out tok/s':>10} {'seconds':>8}  prompt tokens per replica")
    for r in rows:
        print(
            f"{r['method']:<12} {r['hit_rate']:>9.1%} {r['output_tok_s']:>10.1f} {r['seconds']:>8.1f}  "
            f"{r['prompt_tokens_per_replica']}"
        )
