"""The command tree, one module per top-level command: `semguard NAME ...` is `semguard.commands.NAME`.

Each module holds its whole group (`attack generate` and `attack analyze` in attack.py), parses flags
(the shared flag tables are in semguard.config_flags, the subject flags in semguard.subject.flags) and
calls the library; none holds a method. `register(subparsers)` adds the group. Modules import torch
only inside the functions that run a command, so `semguard --help`, `serve` and `health` stay light.
"""
from __future__ import annotations

import importlib

# In the order `semguard --help` lists them.
COMMANDS = ("quickstart", "serve", "attack", "detector", "world", "train", "analyze", "reproduce", "health")


def register_all(subparsers) -> None:
    """Add every command's group to the top-level subparsers."""
    for name in COMMANDS:
        importlib.import_module(f"semguard.commands.{name}").register(subparsers)
