"""`semguard quickstart`: the paper's method end to end on the embedded world (analysis.quickstart)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from semguard.config_flags import Flag, add_world_cache_flag, config_from_flags, defer_config_flags

# Types and defaults come from QuickstartConfig (imported on first use: it imports the whole method).
QUICKSTART_FLAGS: tuple[Flag, ...] = (
    Flag("--classes", "world.n_classes", "number of concepts"),
    Flag("--permutations", "n_permutations", "permutations per layer (paper: 1000)"),
    Flag("--image-sets", "image_sets", "image sets per concept (paper: 5)"),
    Flag("--seed", "seed"),
    Flag("--torch-threads", "torch_threads", "torch intra-op threads (the world's tensors are small)"),
    Flag("--quiet", "progress", "no progress bars"),
)

if TYPE_CHECKING:
    from semguard.analysis.quickstart import QuickstartConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="run the paper's method end to end on the embedded world (offline)",
        description="Builds (or reuses) the embedded world, its word vectors and CNN; runs 2 vs 2 through the "
        "layers, a targeted MI-FGSM attack set and the 1 vs 2 analyses of adversarial and misclassified images, "
        "each with permutation tests and BHY; writes summary.json, figures and report.md.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_world_cache_flag(p, "where built worlds (images, vectors, CNN, attack sets) are kept and reused")
    defer_config_flags(p, "semguard.analysis.quickstart:QuickstartConfig", QUICKSTART_FLAGS)
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="generate the attack set on Ray actors (needs semguard[ray]); ADDRESS: auto, "
                        "ray://HOST:10001, or none to start Ray on this machine")
    p.set_defaults(func=run)


def quickstart_config(args: argparse.Namespace) -> QuickstartConfig:
    """QuickstartConfig for --out and --world-cache, with the flags given."""
    from semguard.analysis.quickstart import QuickstartConfig

    base = QuickstartConfig(out=args.out, cache_dir=args.world_cache, ray=getattr(args, "ray", None))
    return config_from_flags(args, base, QUICKSTART_FLAGS)


def run(args: argparse.Namespace) -> int:
    from semguard.analysis.quickstart import SUBJECT_FILE, run_quickstart

    from semguard.analysis.report import render_summary

    summary = run_quickstart(quickstart_config(args))
    header = json.loads((Path(args.out) / SUBJECT_FILE).read_text())
    print(render_summary(summary, Path(args.out), header))
    return 0
