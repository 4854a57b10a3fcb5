"""The `semguard` command line: fills each component's config at the edge and calls it."""
from __future__ import annotations

import argparse
import sys

from semguard.analysis.cli import add_attack_analyze_command, add_quickstart_command
from semguard.analysis.detector_cli import add_detector_commands
from semguard.attacks.cli import add_attack_commands
from semguard.service.cli import add_serve_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semguard", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_quickstart_command(subparsers)
    add_serve_command(subparsers)
    add_attack_analyze_command(add_attack_commands(subparsers))
    add_detector_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
