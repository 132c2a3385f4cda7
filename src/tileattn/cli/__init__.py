"""The `tileattn` command: `tileattn generate`, `tileattn compare` and `tileattn bench`."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import bench, generate

    parser = argparse.ArgumentParser(prog="tileattn", description="FlashAttention-2 in Triton.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="greedy completion with a transformers model under tileattn",
                       description=generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_arguments(p)
    p.set_defaults(func=generate.run)
    p = sub.add_parser("compare", help="`generate --compare`: the fast path next to transformers' generate with "
                                       "tileattn, sdpa and eager attention",
                       description=generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_arguments(p)
    p.set_defaults(func=generate.run, compare=True)
    p = sub.add_parser("bench", help="accuracy, speed and memory against the other attention backends",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
