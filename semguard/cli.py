"""The `semguard` command line: fills each component's config at the edge and calls it."""
from __future__ import annotations

import argparse
import sys

from semguard.config_flags import DeferredParser


def build_parser() -> argparse.ArgumentParser:
    from semguard.commands import register_all

    parser = argparse.ArgumentParser(prog="semguard", description=__doc__)
    # Commands whose flags come from a heavy config module add them when they are used, not for every parse.
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=DeferredParser)
    register_all(subparsers)
    return parser


# What `pip install 'semguard[all]'` adds to the base install (which serves only).
BATCH_TOOLKIT = {"scipy", "gensim", "art", "matplotlib"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["health"]:  # the container's HEALTHCHECK: grpc only, no torch (commands/health.py)
        from semguard.commands.health import main as health_main
        return health_main(argv[1:])
    try:  # parsing too: a command's flags may come from a config module that needs the toolkit
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in BATCH_TOOLKIT:
            raise
        command = argv[0] if argv else ""
        print(f"semguard {command}: needs the batch toolkit (missing {missing!r}): pip install 'semguard[all]'",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
