"""The command tree is a contract (every command and flag of the tree recorded in
tests/data/cli_flags_contract.json stays; new flags may be added) and matches the file tree
(`semguard NAME ...` lives in semguard/commands/NAME.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from semguard.cli import build_parser
from semguard.commands import COMMANDS

CONTRACT = Path(__file__).parent / "data" / "cli_flags_contract.json"
COMMANDS_DIR = Path(__file__).resolve().parents[1] / "semguard" / "commands"


def command_tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """'attack generate' -> its option strings (positionals by dest), deferred flags included."""
    if hasattr(parser, "complete"):
        parser.complete()
    tree: dict[str, set[str]] = {" ".join(path): set()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                tree.update(command_tree(sub, (*path, name)))
        else:
            tree[" ".join(path)].update(action.option_strings or [action.dest])
    return tree


def test_every_command_and_flag_of_the_contract_is_still_there():
    contract = json.loads(CONTRACT.read_text())
    tree = command_tree(build_parser())
    missing = {cmd: sorted(set(flags) - tree.get(cmd, set())) for cmd, flags in contract.items()}
    assert {cmd: flags for cmd, flags in missing.items() if flags} == {}


def test_the_command_tree_matches_the_file_tree():
    top = {cmd.split(" ")[0] for cmd in command_tree(build_parser()) if cmd}
    assert top == set(COMMANDS)
    assert {p.stem for p in COMMANDS_DIR.glob("*.py")} - {"__init__"} == set(COMMANDS)


def test_a_command_module_holds_its_whole_group():
    """Each group's subcommands are registered by its own module and no other."""
    import importlib

    for name in COMMANDS:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"semguard.commands.{name}").register(sub)
        assert list(sub.choices) == [name]


BATCH = ("quickstart", "attack generate", "attack analyze", "detector calibrate", "detector evaluate",
         "analyze two-vs-two", "analyze training", "reproduce", "train")


def test_batch_commands_share_the_common_flags():
    tree = command_tree(build_parser())
    lacking = {cmd: sorted({"--quiet", "--seed"} - tree[cmd]) for cmd in BATCH}
    assert {cmd: flags for cmd, flags in lacking.items() if flags} == {}
    assert "--quiet" in tree["world build"] and "--quiet" in tree["world export"]
