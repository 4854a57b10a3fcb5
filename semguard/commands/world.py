"""`semguard world build`: build the embedded world, or train it again from scratch and compare
with the files semguard ships (world.shipped). `semguard world export`: write it as real-format
assets (world.export)."""
from __future__ import annotations

import argparse
from pathlib import Path

from semguard.config_flags import add_world_cache_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser("world", help="the embedded world: build it, or rebuild its shipped files")
    commands = world.add_subparsers(dest="world_command", required=True)
    p = commands.add_parser("build", help="render the default world and load (or train) its CNN and vectors")
    add_world_cache_flag(p, "where the world is built")
    p.add_argument("--from-scratch", action="store_true",
                   help="train WorldNet and the SkipGram vectors instead of copying the shipped files, then compare")
    p.add_argument("--write-shipped", action="store_true",
                   help="with --from-scratch: replace the shipped files by the rebuilt ones (maintainers)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_build)
    p = commands.add_parser("export", help="write the world as real-format assets: PNG folder, labels, "
                                           "word2vec binary, WorldNet weights, subject.toml")
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder to write")
    add_world_cache_flag(p, "the world to export (built there first if absent)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_export)


def run_build(args: argparse.Namespace) -> int:
    from semguard.files import sha256_file
    from semguard.world import WorldSettings, build_world, shipped

    if args.write_shipped and not args.from_scratch:
        raise SystemExit("semguard world build: --write-shipped needs --from-scratch")
    settings = WorldSettings()
    world = build_world(settings, args.world_cache, progress=not args.quiet, from_scratch=args.from_scratch)
    print(f"world {world.root}: test accuracy {world.test_accuracy:.4f}, "
          f"timings {', '.join(f'{k} {v:.1f} s' for k, v in world.timings_s.items())}")
    if not args.from_scratch:
        return 0
    want = shipped.manifest()
    same = True
    for name in shipped.FILES:
        got = sha256_file(world.root / name)
        same &= got == want["sha256"][name]
        print(f"{name}: rebuilt {got[:16]}  shipped {want['sha256'][name][:16]}  {'equal' if got == want['sha256'][name] else 'DIFFERENT'}")
    print(f"shipped built on {want['built_on']}; this machine {shipped.machine()}")
    if args.write_shipped:
        shipped.write_shipped(world.root, settings.key(), world.test_accuracy)
        print(f"wrote {shipped.SHIPPED_DIR}")
    return 0 if same or args.write_shipped else 1


def run_export(args: argparse.Namespace) -> int:
    from semguard.world.export import FILES, export_world

    try:
        out = export_world(args.out, args.world_cache, progress=not args.quiet)
    except ValueError as error:
        raise SystemExit(f"semguard world export: {error}") from None
    print(f"wrote {out}: use it with --subject {out / FILES['subject']}")
    return 0
