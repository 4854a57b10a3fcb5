"""`semguard attack ...` subcommands: `attack generate` builds an attack set (paper section 4).

The CLI is the edge: it fills GenerateParams from flags, loads the embedded world's model,
test images and word vectors, and calls attacks.generate.generate_attack_set.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from semguard.attacks.generate import GenerateParams, generate_attack_set
from semguard.attacks.mifgsm import BACKENDS

DEFAULT_WORLD_CACHE = Path(".semguard/world")  # = world.inputs.DEFAULT_CACHE_DIR (not imported: world is heavy)


def add_attack_commands(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `attack` with its `generate` subcommand; returns the attack subparsers (for `attack analyze`)."""
    attack = subparsers.add_parser("attack", help="build and analyse adversarial attack sets")
    commands = attack.add_subparsers(dest="attack_command", required=True)
    p = commands.add_parser("generate", help="targeted MI-FGSM attack set: sources x targets by word similarity",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = GenerateParams()
    p.add_argument("--out", type=Path, required=True, help="attack-set directory (resumed when it exists)")
    p.add_argument("--world-cache", type=Path, default=DEFAULT_WORLD_CACHE,
                   help="embedded world cache: its model, test images and word vectors are attacked")
    p.add_argument("--attack", default=d.attack, choices=["mifgsm", "pgd"])
    p.add_argument("--sources", type=int, default=d.n_sources, help="source concepts (fewer if fewer exist)")
    p.add_argument("--targets-per-source", type=int, default=d.targets_per_source)
    p.add_argument("--eps", type=float, default=d.eps, help="L-inf radius on the [0, 1] pixel scale")
    p.add_argument("--step", type=float, default=d.step, help="step per iteration on the [0, 1] pixel scale")
    p.add_argument("--decay", type=float, default=d.decay, help="momentum decay mu")
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--backend", default=d.backend, choices=BACKENDS)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per attacked batch (= per shard)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the source-concept choice")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=run_generate)
    return commands


def _world_inputs(cache_dir: Path):
    """(model, test images, test labels, class names, word vectors (n_classes, d))."""
    from semguard.world.inputs import load_world_inputs

    inputs = load_world_inputs(cache_dir=cache_dir)
    w = inputs.world
    return inputs.model, w.test_images, w.test_labels, list(w.classes), inputs.word_vectors


def run_generate(args: argparse.Namespace) -> int:
    import torch

    try:
        params = GenerateParams(
            attack=args.attack, eps=args.eps, step=args.step, decay=args.decay, iterations=args.iterations,
            backend=args.backend, n_sources=args.sources, targets_per_source=args.targets_per_source,
            batch_size=args.batch_size, seed=args.seed,
        )
    except ValueError as err:
        raise SystemExit(f"semguard attack generate: {err}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, images, labels, names, vectors = _world_inputs(args.world_cache)
    try:
        result = generate_attack_set(model, images, labels, names, vectors, args.out, params, device=device)
    except ValueError as err:
        raise SystemExit(f"semguard attack generate: {err}") from None
    print(f"{result.out_dir}: {result.n_success}/{result.n_examples} attacks succeeded "
          f"({len(result.computed)} shards computed, {len(result.skipped)} already done)")
    return 0
