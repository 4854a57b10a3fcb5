"""`semguard quickstart` command line."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from semguard.config_flags import Flag, add_config_flags, add_world_cache_flag, config_from_flags, defer_arguments

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


def add_quickstart_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="run the paper's method end to end on the embedded world (offline)",
        description="Builds (or reuses) the embedded world, its word vectors and CNN; runs 2 vs 2 through the "
        "layers, a targeted MI-FGSM attack set and the 1 vs 2 analyses of adversarial and misclassified images, "
        "each with permutation tests and BHY; writes summary.json, figures and report.md.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_world_cache_flag(p, "where built worlds (images, vectors, CNN, attack sets) are kept and reused")
    defer_arguments(p, _add_quickstart_flags)
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="extract the 2 vs 2 activations on Ray actors (needs semguard[ray]); ADDRESS: auto, "
                        "ray://HOST:10001, or none to start Ray on this machine")
    p.set_defaults(func=run)


def _add_quickstart_flags(p: argparse.ArgumentParser) -> None:
    from semguard.analysis.quickstart import QuickstartConfig

    add_config_flags(p, QuickstartConfig, QUICKSTART_FLAGS)


def quickstart_config(args: argparse.Namespace) -> QuickstartConfig:
    """QuickstartConfig for --out and --world-cache, with the flags given."""
    from semguard.analysis.quickstart import QuickstartConfig

    base = QuickstartConfig(out=args.out, cache_dir=args.world_cache, ray=getattr(args, "ray", None))
    return config_from_flags(args, base, QUICKSTART_FLAGS)


def run(args: argparse.Namespace) -> int:
    from semguard.analysis.quickstart import run_quickstart

    from semguard.analysis.report import render_summary

    summary = run_quickstart(quickstart_config(args))
    print(render_summary(summary, Path(args.out)))
    return 0


def add_attack_analyze_command(attack_commands: argparse._SubParsersAction) -> None:
    """`semguard attack analyze`: the paper's 1 vs 2 analyses of an attack set and of natural mistakes."""
    p = attack_commands.add_parser(
        "analyze",
        help="1 vs 2 by layer for an attack set (by target rank) and for misclassified test images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--attack-set", type=Path, required=True, help="directory written by `semguard attack generate`")
    p.add_argument("--out", type=Path, required=True, help="where analysis.json and the figures go")
    add_world_cache_flag(p, "the embedded world's cache (for sets that record no subject)")
    from semguard.subject.flags import add_subject_flags

    add_subject_flags(p)  # default: the subject the set records
    p.add_argument("--trust-model-code", action="store_true",
                   help="allow a recorded subject whose model is user code (model_entry) to be imported and run")
    p.add_argument("--permutations", type=int, default=1000, help="permutations per layer (paper: 1000)")
    p.add_argument("--reference-size", type=int, default=100, help="reference concepts (paper: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="a subject's set: read at most N test images for the misclassified study and the references "
                        "(stratified over the classes with a word vector; default: all)")
    p.set_defaults(func=run_attack_analyze)


def attack_set_subject(args: argparse.Namespace, header: dict):
    """The subject to analyse a set on: the subject flags when they name assets, else what the set
    records (`attack generate` writes it; a --world-cache given explicitly still replaces a recorded
    world's cache), else the embedded world in --world-cache (sets older than the record)."""
    import dataclasses

    from semguard.subject.core import subject_spec_from_record
    from semguard.subject.flags import subject_spec_from_args
    from semguard.world_cache import DEFAULT_WORLD_CACHE

    spec = subject_spec_from_args(args, world_cache=args.world_cache)
    if spec.is_world() and header.get("subject") is not None:
        recorded = subject_spec_from_record(header["subject"], f"{args.attack_set / 'params.json'}: subject",
                                            trust_model_code=args.trust_model_code,
                                            trust_pickled_vectors=bool(args.trust_pickled_vectors))
        moved = recorded.is_world() and Path(args.world_cache) != Path(DEFAULT_WORLD_CACHE)
        spec = dataclasses.replace(recorded, world_cache=Path(args.world_cache)) if moved else recorded
    return spec


def run_attack_analyze(args: argparse.Namespace) -> int:
    from semguard.analysis.quickstart import analyze_attacks
    from semguard.attacks.generate import model_fingerprint
    from semguard.attacks.store import load_attack_set
    from semguard.world.inputs import load_world_inputs

    try:
        if args.max_images is not None and args.max_images < 1:
            raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
        attack_set = load_attack_set(args.attack_set)
        spec = attack_set_subject(args, attack_set.header)
        if spec.is_world():
            from semguard.world import WorldSettings

            inputs = load_world_inputs(settings=WorldSettings(seed=spec.world_seed), cache_dir=spec.world_cache)
            model, where = inputs.model, f"the world in {spec.world_cache}"
        else:
            from semguard.subject.core import load_subject

            subject = load_subject(spec)
            model, where = subject.model, f"the subject's model ({subject.name})"
        if attack_set.header["model_sha256"] != model_fingerprint(model):
            raise ValueError(f"{args.attack_set} was generated against another model than {where}")
        if spec.is_world():
            if args.max_images is not None:
                raise ValueError("--max-images: for a subject's set (the embedded world's test split is read whole)")
            result = analyze_attacks(inputs, attack_set, args.out, args.reference_size, args.permutations, args.seed)
        else:
            from semguard.analysis.subject_attacks import analyze_subject_attacks

            result = analyze_subject_attacks(subject, attack_set, args.out, args.reference_size, args.permutations,
                                             args.seed, max_images=args.max_images)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"semguard attack analyze: {err}") from None
    adv = result["adversarial_one_vs_two"]
    print(json.dumps({
        "attacks": result["attacks"],
        "layers": adv["layers"],
        "one_vs_two_mean_over_ranks": [round(a, 3) for a in adv["accuracy"]],
        "misclassified_count": result["misclassified"]["count"],
        "misclassified_mean_cosine": round(result["misclassified"]["mean_cosine"], 3),
    }, indent=2))
    print(f"figures and analysis.json in {args.out}")
    return 0
