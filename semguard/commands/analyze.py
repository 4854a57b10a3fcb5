"""`semguard analyze ...`: `two-vs-two` (the paper's Figure 1 for any subject), `training` (2 vs 2 at
every checkpoint, Figures 2-3) and `diagram` (a network's tapped layers coloured by 2 vs 2). Only argparse
here: torch loads when a command runs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from semguard.config_flags import Flag, add_world_cache_flag, config_from_flags, defer_config_flags
from semguard.too_small import TooSmall


def two_vs_two_flags(field_prefix: str = "") -> tuple[Flag, ...]:
    """The 2 vs 2 pipeline's flags (analysis.subject_two_vs_two.TwoVsTwoConfig fields under `field_prefix`):
    `analyze two-vs-two` and `reproduce` share them."""
    return (
        Flag("--permutations", f"{field_prefix}n_permutations", "permutations per layer (paper: 1000)"),
        Flag("--image-sets", f"{field_prefix}image_sets", "image sets, one image per matched class each (paper: 5)"),
        Flag("--memory-budget", f"{field_prefix}memory_budget_gib",
             "GiB of activations held at once (layers are grouped into passes)"),
        Flag("--device", f"{field_prefix}device", "cpu, cuda, cuda:1 ... (default: CUDA when present)"),
    )


# Types and defaults come from analysis.subject_two_vs_two.TwoVsTwoConfig (imported on first use).
TWO_VS_TWO_FLAGS: tuple[Flag, ...] = (
    *two_vs_two_flags(),
    Flag("--seed", "seed", "seed of the permutations"),
    Flag("--batch-size", "batch_size", "images per forward pass"),
    Flag("--quiet", "progress", "no progress bars"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """`semguard analyze training|diagram|two-vs-two`."""
    analyze = subparsers.add_parser("analyze", help="2 vs 2 for any subject, training dynamics, architecture diagrams")
    commands = analyze.add_subparsers(dest="analyze_command", required=True)
    p = commands.add_parser(
        "training", help="2 vs 2 of every layer at every checkpoint (paper Figures 2-3)",
        description="2 vs 2 of every tapped layer at every checkpoint. No subject flag: `semguard train` checkpoints "
        "on the embedded world's test images and word vectors. --images/--labels/--vectors: the same checkpoints "
        "(FractalNet, 32 x 32 inputs) on your images (a cifar-100-binary folder: its test.bin) and vectors. "
        "With --model or --model-entry too: a folder of your model's weights files (epoch_5.pt, "
        "epoch-0005.safetensors; the epoch is the last number of the name), each loaded as --weights.")
    p.add_argument("--checkpoints", type=Path, required=True,
                   help="a `semguard train --out` directory, or with --model a folder of weights files")
    p.add_argument("--permuted", type=Path, help="the permuted-label run's directory, analysed beside it")
    p.add_argument("--out", type=Path, required=True, help="training.json, per-checkpoint results and figures")
    p.add_argument("--permutations", type=int, default=200,
                   help="permutations per layer and checkpoint (paper: 1000; the default, %(default)s, keeps a "
                   "10-checkpoint run in minutes)")
    p.add_argument("--image-sets", type=int, default=5, help="image sets per concept (paper and default: 5)")
    p.add_argument("--seed", type=int, default=0, help="permutation seed (default: %(default)s)")
    p.add_argument("--memory-budget", type=float, default=4.0, metavar="GIB",
                   help="activations held at once; a big model's layers are tapped in passes (default: %(default)s)")
    p.add_argument("--quiet", action="store_true")
    add_world_cache_flag(p, "the embedded world's cache (test images and word vectors)")
    from semguard.subject.flags import add_subject_flags

    add_subject_flags(p)
    p.set_defaults(func=run_analyze_training)
    d = commands.add_parser("diagram", help="a network's tapped layers by block, coloured by 2 vs 2")
    d.add_argument("--model", required=True, help="torchvision architecture, fractalnet or worldnet")
    d.add_argument("--weights", type=Path, help="weights file (.safetensors or a torch state dict)")
    d.add_argument("--results", type=Path, help="a 2 vs 2 result (summary.json, two_vs_two.json, epoch-NNNN.json)")
    d.add_argument("--out", type=Path, required=True, help="FILE.svg or FILE.png")
    d.set_defaults(func=run_diagram)
    add_two_vs_two_command(commands)


def run_analyze_training(args: argparse.Namespace) -> int:
    import torch
    from semguard.analysis.training import TrainingAnalysisConfig, analyze_training_subject
    from semguard.subject.flags import subject_spec_from_args

    torch.set_num_threads(1)
    config = TrainingAnalysisConfig(args.image_sets, args.permutations, args.seed, progress=not args.quiet,
                                    memory_budget_gib=args.memory_budget)
    try:
        if args.memory_budget <= 0:
            raise ValueError(f"--memory-budget must be > 0 GiB, got {args.memory_budget}")
        spec = subject_spec_from_args(args, world_cache=args.world_cache)
        summary = analyze_training_subject(args.checkpoints, args.out, spec, config, args.permuted)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"semguard analyze training: {err}") from None
    print(json.dumps(summary["findings"], indent=1))
    print(f"training.json, training_heatmap.png and training_by_block.png in {args.out}")
    return 0


def run_diagram(args: argparse.Namespace) -> int:
    from semguard.analysis.diagram import diagram_model, draw_diagram, load_results

    if args.out.suffix not in (".svg", ".png"):
        raise SystemExit(f"semguard analyze diagram: --out must end in .svg or .png, got {args.out}")
    try:
        model, infos = diagram_model(args.model, args.weights)
        results = load_results(args.results) if args.results else None
        drawn = draw_diagram(model, infos, args.out, title=args.model, results=results)
    except ValueError as err:
        raise SystemExit(f"semguard analyze diagram: {err}") from None
    print(f"{args.out}: {len(drawn.labels)} tapped layers in {len(drawn.blocks)} blocks")
    return 0


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
    p.add_argument("--prototypes", action="store_true",
                   help="also 2 vs 2 on the classifier's class prototypes (its final layer's weight rows: every class "
                        "with a word vector, no image needed; one figure, not per layer) -> OUT/prototypes.json; the "
                        "image sets' 2 vs 2 then runs where the images allow it and says why not where they do not")
    add_subject_flags(p)
    add_world_cache_flag(p, "the embedded world's cache (when no subject asset is given)")
    defer_config_flags(p, "semguard.analysis.subject_two_vs_two:TwoVsTwoConfig", TWO_VS_TWO_FLAGS)
    p.set_defaults(func=run_two_vs_two_command)


def run_two_vs_two_command(args: argparse.Namespace) -> int:
    from semguard.analysis.subject_two_vs_two import TwoVsTwoConfig, run_two_vs_two
    from semguard.subject.core import load_subject
    from semguard.subject.flags import subject_spec_from_args

    config = config_from_flags(args, TwoVsTwoConfig(), TWO_VS_TWO_FLAGS)
    try:
        subject = load_subject(subject_spec_from_args(args, world_cache=args.world_cache), progress=config.progress)
        if args.prototypes:
            _print_prototypes(subject, args.out, config)
        result = run_two_vs_two(subject, args.out, config)
    except TooSmall as err:
        if not args.prototypes:
            raise SystemExit(f"semguard analyze two-vs-two: {err}") from None
        print(f"2 vs 2 on image sets skipped: {err}")
        return 0
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"semguard analyze two-vs-two: {err}") from None
    from semguard.subject.header import render_subject_header

    significant = sum(result["significant"])
    print("\n".join(render_subject_header(result["header"])))
    print(f"2 vs 2 on {result['model']} ({result['concepts']} classes, {result['image_sets']} image sets): pixels "
          f"{result['pixels']:.3f} | first layer {result['accuracy'][0]:.3f} | last layer {result['accuracy'][-1]:.3f} "
          f"| significant after BHY: {significant} of {len(result['layers'])} layers (chance 0.5)")
    print(f"written: {Path(args.out) / 'two_vs_two.json'}, two_vs_two_by_layer.png "
          f"({len(result['computed'])} layers computed, {len(result['layers']) + 1 - len(result['computed'])} reused)")
    return 0


def _print_prototypes(subject, out: Path, config) -> None:
    from semguard.analysis.prototype_two_vs_two import PROTOTYPES_FILE, write_prototype_two_vs_two

    try:
        r = write_prototype_two_vs_two(subject, out, config.n_permutations, config.seed, config.device)
    except TooSmall as err:
        print(f"2 vs 2 on class prototypes skipped: {err}")
        return
    print(f"2 vs 2 on {r['model']}'s class prototypes ({r['layer']} weight rows, {r['concepts']} classes): "
          f"{r['accuracy']:.3f} (p {r['p_value']:.4f}, {r['n_permutations']} permutations; chance 0.5) -> "
          f"{Path(out) / PROTOTYPES_FILE}", flush=True)
