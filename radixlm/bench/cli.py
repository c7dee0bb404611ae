"""`radixlm bench offline|prefix|serving`: radixlm against transformers, measured in the same run.

    radixlm bench offline                      # 64 random requests, qwen2 0.5b (random weights, bf16)
    radixlm bench prefix --workload both       # shared system prompts, and multi-turn chats
    radixlm bench serving --backend both --request-rate 4
    radixlm bench quant                        # decode tok/s of bf16 vs int8 / int4 weight-only, and quality
    radixlm bench lang                         # a few-shot select + gen program vs the OpenAI API, cache off

Without --model-path, the Qwen2.5-0.5B-shaped qwen2 folder from radixlm.testing is written locally (once)
and used: nothing is downloaded. See BENCHMARKS.md for what each baseline does and how tokens are counted.
"""

from __future__ import annotations

import argparse
import sys

from radixlm.bench.vllm_baseline import add_vllm_args, options_from_args
from radixlm.cli_args import add_engine_args, config_from_args


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")


def _add_hf_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("transformers baselines")
    group.add_argument(
        "--skip-hf-generate", action="store_true", help="skip transformers generate (static batches)"
    )
    group.add_argument(
        "--skip-generate-batch",
        action="store_true",
        help="skip transformers generate_batch (continuous batching)",
    )
    group.add_argument(
        "--hf-cb-max-batch-tokens",
        type=int,
        default=None,
        help="transformers continuous batching: max tokens per step (default: 1024 on CPU, else transformers' 8192)",
    )
    group.add_argument(
        "--hf-cb-num-blocks",
        type=int,
        default=None,
        help="transformers continuous batching: KV blocks of 256 tokens (default: the whole workload at once)",
    )


def _add_engine(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    # Benchmarks run in bf16 (about 2x fp32 on CPUs that have it) and quietly.
    parser.set_defaults(dtype="bfloat16", log_level="warning")


def _cb_options(ns: argparse.Namespace):
    from radixlm.bench.hf_baselines import ContinuousBatchingOptions

    return ContinuousBatchingOptions(
        num_blocks=ns.hf_cb_num_blocks, max_batch_tokens=ns.hf_cb_max_batch_tokens
    )


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {value!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixlm bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)

    p = sub.add_parser(
        "offline", help="throughput on random prompts vs transformers generate / generate_batch"
    )
    p.add_argument("--num-requests", type=_positive, default=64)
    p.add_argument("--min-prompt", type=_positive, default=64)
    p.add_argument("--max-prompt", type=_positive, default=512)
    p.add_argument("--min-output", type=_positive, default=32)
    p.add_argument("--max-output", type=_positive, default=128)
    p.add_argument(
        "--hf-batch-sizes",
        type=_batch_sizes,
        default=(8, 16),
        help="static batch sizes for generate (default 8,16)",
    )
    p.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="run every system this many times on the same requests (caches dropped between); each "
        "system's fastest round counts, and the notes list every round (default 1)",
    )
    p.add_argument(
        "--json-schema",
        default=None,
        help="also run radixlm with this JSON schema (text, a file, or 'default') on every request, and "
        "report the throughput it costs",
    )
    _add_common(p)
    _add_hf_args(p)
    add_vllm_args(p)
    _add_engine(p)

    p = sub.add_parser("prefix", help="shared-prefix and multi-turn workloads (prefix cache)")
    p.add_argument("--workload", choices=("shared-prefix", "multi-turn", "both"), default="both")
    p.add_argument("--num-groups", type=_positive, default=8, help="shared-prefix: groups (system prompts)")
    p.add_argument("--group-size", type=_positive, default=8, help="shared-prefix: requests per group")
    p.add_argument(
        "--prefix-len", type=_positive, default=1024, help="shared-prefix: shared tokens per group"
    )
    p.add_argument("--question-len", type=_positive, default=64, help="shared-prefix: own tokens per request")
    p.add_argument("--output-len", type=_positive, default=32, help="output tokens per request / turn")
    p.add_argument("--num-conversations", type=_positive, default=16, help="multi-turn: conversations")
    p.add_argument("--num-turns", type=_positive, default=4, help="multi-turn: turns per conversation")
    p.add_argument("--first-turn-len", type=_positive, default=512, help="multi-turn: first prompt's tokens")
    p.add_argument("--turn-len", type=_positive, default=64, help="multi-turn: new tokens in each later turn")
    p.add_argument(
        "--hf-batch-size", type=_positive, default=8, help="static batch size for generate (default 8)"
    )
    _add_common(p)
    _add_hf_args(p)
    p.add_argument("--skip-no-cache", action="store_true", help="skip radixlm with --disable-radix-cache")
    add_vllm_args(p)
    _add_engine(p)

    p = sub.add_parser("serving", help="online serving over HTTP: Poisson arrivals, streaming, latencies")
    from radixlm.bench.serving import add_serving_args

    add_serving_args(p)
    _add_common(p)

    p = sub.add_parser("router", help="data-parallel routing: cache-aware vs round robin, shared prefixes")
    from radixlm.bench.router import add_router_args

    add_router_args(p)
    _add_common(p)
    _add_engine(p)
    p.set_defaults(dp_size=2, dtype="float32")

    p = sub.add_parser("overhead", help="per-step host time vs forward time, before (another tree) and after")
    from radixlm.bench.overhead import add_overhead_args

    add_overhead_args(p)
    _add_common(p)

    p = sub.add_parser("quant", help="decode tok/s: bf16 vs int8 / int4 weight-only; quality on SmolLM2")
    from radixlm.bench.quant import add_quant_args

    add_quant_args(p)
    _add_common(p)

    p = sub.add_parser("decode", help="batch-1 decode tok/s against the memory-bandwidth bound")
    from radixlm.bench.decode import add_decode_args

    add_decode_args(p)
    _add_common(p)

    p = sub.add_parser("lang", help="a few-shot program: radixlm's language vs the OpenAI API, cache off")
    from radixlm.bench.lang import add_lang_args

    add_lang_args(p)
    _add_common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if ns.bench == "offline":
        from radixlm.bench.offline import OfflineOptions, run_offline

        if ns.min_prompt > ns.max_prompt or ns.min_output > ns.max_output:
            print("radixlm bench offline: --min-* must not exceed --max-*", file=sys.stderr)
            return 2
        opts = OfflineOptions(
            num_requests=ns.num_requests,
            min_prompt=ns.min_prompt,
            max_prompt=ns.max_prompt,
            min_output=ns.min_output,
            max_output=ns.max_output,
            seed=ns.seed,
            hf_batch_sizes=ns.hf_batch_sizes,
            skip_hf_generate=ns.skip_hf_generate,
            skip_generate_batch=ns.skip_generate_batch,
            cb=_cb_options(ns),
            vllm=options_from_args(ns),
            json_schema=_json_schema_arg(ns.json_schema),
            rounds=ns.rounds,
        )
        reports = [run_offline(config_from_args(ns), opts)]
    elif ns.bench == "prefix":
        from radixlm.bench.prefix import PrefixOptions, run_prefix

        opts = PrefixOptions(
            workloads=("shared-prefix", "multi-turn") if ns.workload == "both" else (ns.workload,),
            num_groups=ns.num_groups,
            group_size=ns.group_size,
            prefix_len=ns.prefix_len,
            question_len=ns.question_len,
            output_len=ns.output_len,
            num_conversations=ns.num_conversations,
            num_turns=ns.num_turns,
            first_turn_len=ns.first_turn_len,
            turn_len=ns.turn_len,
            seed=ns.seed,
            hf_batch_size=ns.hf_batch_size,
            skip_hf_generate=ns.skip_hf_generate,
            skip_generate_batch=ns.skip_generate_batch,
            skip_no_cache=ns.skip_no_cache,
            cb=_cb_options(ns),
            vllm=options_from_args(ns),
        )
        reports = run_prefix(config_from_args(ns), opts)
    elif ns.bench == "router":
        import json

        from radixlm.bench.common import resolve_config
        from radixlm.bench.router import print_rows, run_router

        config = resolve_config(config_from_args(ns))
        rows = run_router(config, ns)
        print_rows(rows, config, ns)
        if ns.json:
            with open(ns.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    elif ns.bench == "lang":
        from radixlm.bench.lang import run_lang_bench

        run_lang_bench(ns)
        return 0
    elif ns.bench == "quant":
        from radixlm.bench.quant import run_quant_bench

        run_quant_bench(ns)
        return 0
    elif ns.bench == "decode":
        from radixlm.bench.decode import run_decode_bench

        report = run_decode_bench(ns)
        print()
        print(report.table())
        if ns.json:
            import json

            with open(ns.json, "w") as f:
                json.dump(report.to_dict(), f, indent=1)
        return 0
    elif ns.bench == "overhead":
        from radixlm.bench.overhead import run_overhead_from_args

        reports = [run_overhead_from_args(ns)]
    else:
        from radixlm.bench.serving import run_serving_from_args

        reports = run_serving_from_args(ns)
        if not reports:
            return 1
    for report in reports:
        print()
        print(report.table())
    if ns.json:
        from radixlm.bench.report import write_json

        write_json(ns.json, reports)
        print(f"\nresults written to {ns.json}")
    return 0


def _json_schema_arg(value: str | None) -> str | None:
    """--json-schema: JSON text, a file holding it, or 'default' (offline.DEFAULT_BENCH_SCHEMA)."""
    if value is None:
        return None
    if value == "default":
        from radixlm.bench.offline import DEFAULT_BENCH_SCHEMA

        return DEFAULT_BENCH_SCHEMA
    import pathlib

    path = pathlib.Path(value)
    return path.read_text() if not value.lstrip().startswith("{") and path.is_file() else value
