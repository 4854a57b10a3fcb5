"""The `semguard` command line: fills each component's config at the edge and calls it."""
from __future__ import annotations

import argparse
import sys

from semguard.config_flags import DeferredParser


def build_parser() -> argparse.ArgumentParser:
    # imported here, not at the top: `semguard health` (a container probe) must not pay for torch
    from semguard.analysis.cli import add_attack_analyze_command, add_quickstart_command
    from semguard.analysis.detector_cli import add_detector_commands
    from semguard.analysis.study_cli import add_reproduce_command
    from semguard.analysis.training_cli import add_analyze_commands, add_train_command
    from semguard.attacks.cli import add_attack_commands
    from semguard.service.cli import add_serve_command
    from semguard.service.health_cli import add_health_command
    from semguard.world.cli import add_world_commands

    parser = argparse.ArgumentParser(prog="semguard", description=__doc__)
    # Commands whose flags come from a heavy config module add them when they are used, not for every parse.
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=DeferredParser)
    add_quickstart_command(subparsers)
    add_serve_command(subparsers)
    add_attack_analyze_command(add_attack_commands(subparsers))
    add_detector_commands(subparsers)
    add_world_commands(subparsers)
    add_train_command(subparsers)
    add_analyze_commands(subparsers)
    add_reproduce_command(subparsers)
    add_health_command(subparsers)
    return parser


# What `pip install 'semguard[all]'` adds to the base install (which serves only).
BATCH_TOOLKIT = {"scipy", "gensim", "art", "matplotlib"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["health"]:  # the container's HEALTHCHECK: grpc only, no torch (service/health_cli.py)
        from semguard.service.health_cli import main as health_main
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
