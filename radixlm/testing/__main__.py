"""`python -m radixlm.testing --arch qwen2 --size tiny --out DIR`: write an offline model folder.

`main` takes the same flags as `radixlm make-model`, so the top-level CLI can delegate to it.
Without --out the folder goes to (or is reused from) the test-model cache, and its path is printed.
"""

from __future__ import annotations

import argparse
import sys

from radixlm.testing.model_folders import ARCHITECTURES, SIZES, cached_model_folder, make_model_folder


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m radixlm.testing", description="Write a Hugging Face model folder with random weights."
    )
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES)
    parser.add_argument("--size", default="tiny", choices=SIZES)
    parser.add_argument("--out", default=None, help="folder to write (default: the shared test-model cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: float32 for tiny, bfloat16 for 0.5b",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        if args.dtype != "auto":
            raise SystemExit("--dtype needs --out: the cache holds default-dtype folders only")
        path = cached_model_folder(args.arch, args.size, seed=args.seed)
    else:
        path = make_model_folder(args.arch, args.size, args.out, seed=args.seed, dtype=args.dtype)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
