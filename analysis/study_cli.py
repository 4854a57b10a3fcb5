"""`semguard analyze two-vs-two` (Figure 1 for any subject) and `semguard reproduce` (the paper's
whole study on real assets). Only argparse here: torch loads when a command runs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from semguard.config_flags import Flag, add_config_flags, add_world_cache_flag, config_from_flags, defer_arguments

# Types and defaults come from analysis.subject_two_vs_two.TwoVsTwoConfig (imported on first use).
TWO_VS_TWO_FLAGS: tuple[Flag, ...] = (
    Flag("--permutations", "n_permutations", "permutations per layer (paper: 1000)"),
    Flag("--image-sets", "image_sets", "image sets, one image per matched class each (paper: 5)"),
    Flag("--seed", "seed", "seed of the permutations"),
    Flag("--memory-budget", "memory_budget_gib", "GiB of activations held at once (layers are grouped into passes)"),
    Flag("--batch-size", "batch_size", "images per forward pass"),
    Flag("--device", "device", "cpu, cuda, cuda:1 ... (default: CUDA when present)"),
    Flag("--quiet", "progress", "no progress bars"),
)
# analysis.reproduce.StudyConfig; a flag given here overrides the file's [study] table.
STUDY_FLAGS: tuple[Flag, ...] = (
    Flag("--permutations", "two_vs_two.n_permutations", "permutations per layer, 2 vs 2 and 1 vs 2 (paper: 1000)"),
    Flag("--image-sets", "two_vs_two.image_sets", "image sets per class (paper: 5)"),
    Flag("--memory-budget", "two_vs_two.memory_budget_gib", "GiB of activations held at once"),
    Flag("--device", "two_vs_two.device", "cpu, cuda ... (default: CUDA when present)"),
    Flag("--sources", "attack.n_sources", "attacked source classes (paper: 100, 6 targets each)"),
    Flag("--reference-size", "reference_size", "1 vs 2 reference classes (paper: 100)"),
    Flag("--seed", "seed", "seed of the permutations, sources and references"),
    Flag("--quiet", "progress", "no progress bars"),
)


def add_two_vs_two_command(analyze_commands: argparse._SubParsersAction) -> None:
    """`semguard analyze two-vs-two` under `semguard analyze`."""
    from semguard.subject.flags import add_subject_flags

    p = analyze_commands.add_parser(
        "two-vs-two", help="2 vs 2 of pixels and every tapped layer against the word vectors (paper Figure 1)",
        description="The paper's Figure 1 for a subject (the embedded world when none is given): image sets of one "
        "image per matched class, pixels then every tapped layer, permutation tests and BHY. Activations stream "
        "under --memory-budget; each finished layer is kept in OUT/layers, so rerunning a killed run resumes. "
        "Writes two_vs_two.json and two_vs_two_by_layer.png.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_subject_flags(p)
    add_world_cache_flag(p, "the embedded world's cache (when no subject asset is given)")
    defer_arguments(p, _add_two_vs_two_flags)
    p.set_defaults(func=run_two_vs_two_command)


def _add_two_vs_two_flags(p: argparse.ArgumentParser) -> None:
    from semguard.analysis.subject_two_vs_two import TwoVsTwoConfig

    add_config_flags(p, TwoVsTwoConfig, TWO_VS_TWO_FLAGS)


def run_two_vs_two_command(args: argparse.Namespace) -> int:
    from semguard.analysis.subject_two_vs_two import TwoVsTwoConfig, run_two_vs_two
    from semguard.subject.core import load_subject
    from semguard.subject.flags import subject_spec_from_args

    config = config_from_flags(args, TwoVsTwoConfig(), TWO_VS_TWO_FLAGS)
    try:
        subject = load_subject(subject_spec_from_args(args, world_cache=args.world_cache), progress=config.progress)
        result = run_two_vs_two(subject, args.out, config)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"semguard analyze two-vs-two: {err}") from None
    significant = sum(result["significant"])
    print(f"2 vs 2 on {result['model']} ({result['concepts']} classes, {result['image_sets']} image sets): pixels "
          f"{result['pixels']:.3f} | first layer {result['accuracy'][0]:.3f} | last layer {result['accuracy'][-1]:.3f} "
          f"| significant after BHY: {significant} of {len(result['layers'])} layers (chance 0.5)")
    print(f"written: {Path(args.out) / 'two_vs_two.json'}, two_vs_two_by_layer.png "
          f"({len(result['computed'])} layers computed, {len(result['layers']) + 1 - len(result['computed'])} reused)")
    return 0


def add_reproduce_command(subparsers: argparse._SubParsersAction) -> None:
    """`semguard reproduce`."""
    p = subparsers.add_parser(
        "reproduce", help="the paper's whole study on your models, images and vectors (resumable)",
        description="For each model of the study file: 2 vs 2 through the layers (Figure 1), a targeted MI-FGSM "
        "attack set, 1 vs 2 of adversarial and misclassified images (Figures 4-6), block averages, then report.md "
        "with the paper's numbers beside ours. Every stage keeps its outputs in OUT/<model>/ and is skipped when "
        "rerun; a killed run resumes. See the README for paper.toml.",
    )
    p.add_argument("--subject", type=Path, required=True, metavar="FILE",
                   help="study TOML: shared subject keys, one [[models]] table per architecture, optional [study]")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_world_cache_flag(p, "the embedded world's cache (for a [[models]] table naming no asset)")
    defer_arguments(p, _add_study_flags)
    p.set_defaults(func=run_reproduce_command)


def _add_study_flags(p: argparse.ArgumentParser) -> None:
    from semguard.analysis.reproduce import StudyConfig

    add_config_flags(p, StudyConfig, STUDY_FLAGS)


def run_reproduce_command(args: argparse.Namespace) -> int:
    from semguard.analysis.reproduce import read_study, reproduce

    try:
        study = read_study(args.subject, world_cache=args.world_cache)
        study = study._replace(config=config_from_flags(args, study.config, STUDY_FLAGS))
        summary = reproduce(study, args.out)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"semguard reproduce: {err}") from None
    print(json.dumps({name: m["headline"] for name, m in summary["models"].items()}, indent=1))
    print(f"written: {Path(args.out) / 'report.md'}, study.json and one folder per model")
    return 0
