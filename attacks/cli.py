"""`semguard attack ...` subcommands: `attack generate` builds an attack set (paper section 4).

The CLI is the edge: it fills GenerateParams from flags, loads the embedded world's model,
test images and word vectors, and calls attacks.generate.generate_attack_set.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from semguard.config_flags import Flag, add_config_flags, add_world_cache_flag, config_from_flags, defer_arguments

if TYPE_CHECKING:
    from semguard.attacks.generate import GenerateParams


def generate_flags() -> tuple[Flag, ...]:
    """Types and defaults come from GenerateParams; choices from what it validates against (imported
    here: the attacks import torch, which `semguard serve` and `semguard --help` need not wait for)."""
    from semguard.attacks.generate import _ATTACK_ARGS
    from semguard.attacks.mifgsm import BACKENDS

    return (
        Flag("--attack", "attack", choices=tuple(_ATTACK_ARGS)),
        Flag("--sources", "n_sources", "source concepts (fewer if fewer exist)"),
        Flag("--targets-per-source", "targets_per_source"),
        Flag("--eps", "eps", "L-inf radius on the [0, 1] pixel scale"),
        Flag("--step", "step", "step per iteration on the [0, 1] pixel scale"),
        Flag("--decay", "decay", "momentum decay mu"),
        Flag("--iterations", "iterations"),
        Flag("--backend", "backend", choices=BACKENDS),
        Flag("--batch-size", "batch_size", "images per attacked batch (= per shard)"),
        Flag("--seed", "seed", "seed of the source-concept choice"),
    )


def _add_generate_flags(p: argparse.ArgumentParser) -> None:
    from semguard.attacks.generate import GenerateParams

    add_config_flags(p, GenerateParams, generate_flags())


def add_attack_commands(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `attack` with its `generate` subcommand; returns the attack subparsers (for `attack analyze`)."""
    attack = subparsers.add_parser("attack", help="build and analyse adversarial attack sets")
    commands = attack.add_subparsers(dest="attack_command", required=True)
    p = commands.add_parser("generate", help="targeted MI-FGSM attack set: sources x targets by word similarity")
    p.add_argument("--out", type=Path, required=True, help="attack-set directory (resumed when it exists)")
    add_world_cache_flag(p, "embedded world cache: its model, test images and word vectors are attacked")
    defer_arguments(p, _add_generate_flags)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="attack the shards on Ray actors (needs semguard[ray]); ADDRESS: auto (the running "
                        "cluster), ray://HOST:10001, or none to start Ray on this machine; this process writes")
    p.add_argument("--ray-actors", type=int, default=0, metavar="N",
                   help="with --ray: actors, one model each (default: one per GPU, else one per CPU)")
    p.set_defaults(func=run_generate)
    return commands


def params_from_args(args: argparse.Namespace) -> GenerateParams:
    """GenerateParams with the flags given; SystemExit with the message of a value it rejects."""
    try:
        from semguard.attacks.generate import GenerateParams

        return config_from_flags(args, GenerateParams(), generate_flags())
    except ValueError as err:
        raise SystemExit(f"semguard attack generate: {err}") from None


def _world_inputs(cache_dir: Path):
    """(model, test images, test labels, class names, word vectors (n_classes, d))."""
    from semguard.world.inputs import load_world_inputs

    inputs = load_world_inputs(cache_dir=cache_dir)
    w = inputs.world
    return inputs.model, w.test_images, w.test_labels, list(w.classes), inputs.word_vectors


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from semguard.attacks.generate import generate_attack_set

    params = params_from_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, images, labels, names, vectors = _world_inputs(args.world_cache)
    try:
        if args.ray is None:
            result = generate_attack_set(model, images, labels, names, vectors, args.out, params, device=device)
        else:  # the only place that imports ray
            from semguard.attacks.distributed import RayParams, generate_attack_set_ray

            result = generate_attack_set_ray(model, images, labels, names, vectors, args.out, params,
                                             RayParams(address=args.ray, actors=args.ray_actors), device=device)
    except ValueError as err:
        raise SystemExit(f"semguard attack generate: {err}") from None
    print(f"{result.out_dir}: {result.n_success}/{result.n_examples} attacks succeeded "
          f"({len(result.computed)} shards computed, {len(result.skipped)} already done)")
    return 0
