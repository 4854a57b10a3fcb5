"""`semguard reproduce`: the paper's whole study on real assets (analysis.reproduce). Only argparse
here: torch loads when the command runs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from semguard.commands.analyze import two_vs_two_flags
from semguard.config_flags import Flag, add_world_cache_flag, config_from_flags, defer_config_flags

# analysis.reproduce.StudyConfig; a flag given here overrides the file's [study] table.
STUDY_FLAGS: tuple[Flag, ...] = (
    *two_vs_two_flags("two_vs_two."),  # --permutations counts for 1 vs 2 too
    Flag("--sources", "attack.n_sources", "attacked source classes (paper: 100, 6 targets each)"),
    Flag("--reference-size", "reference_size", "1 vs 2 reference classes (paper: 100)"),
    Flag("--seed", "seed", "seed of the permutations, sources and references"),
    Flag("--quiet", "progress", "no progress bars"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
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
    defer_config_flags(p, "semguard.analysis.reproduce:StudyConfig", STUDY_FLAGS)
    p.set_defaults(func=run_reproduce_command)


def run_reproduce_command(args: argparse.Namespace) -> int:
    from semguard.analysis.reproduce import read_study, reproduce, skipped_parts

    try:
        study = read_study(args.subject, world_cache=args.world_cache)
        study = study._replace(config=config_from_flags(args, study.config, STUDY_FLAGS))
        summary = reproduce(study, args.out)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"semguard reproduce: {err}") from None
    from semguard.subject.header import render_subject_header

    for name, m in summary["models"].items():
        if m.get("header"):
            print(f"{name}: " + "\n".join(render_subject_header(m["header"])))
        for part, skipped in skipped_parts(m).items():
            print(f"  skipped {part}: {skipped['reason']} (count: {skipped['count']})")
    print(json.dumps({name: m["headline"] for name, m in summary["models"].items()}, indent=1))
    print(f"written: {Path(args.out) / 'report.md'}, study.json and one folder per model")
    return 0
