"""`semguard train` and `semguard analyze training|diagram`: the paper's training-dynamics study
(Figures 2-3) and annotated architecture diagrams. Only argparse here: torch loads when a command runs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from semguard.config_flags import (
    Flag,
    add_config_flags,
    add_world_cache_flag,
    config_from_flags,
    defer_arguments,
)

# Types and defaults come from analysis.training_run.TrainConfig (imported on first use).
TRAIN_FLAGS: tuple[Flag, ...] = (
    Flag("--epochs", "epochs", "epochs (with --permute-labels: the most to try)"),
    Flag("--columns", "model.columns", "FractalNet columns C (block depth 2^(C-1); paper: 3)"),
    Flag("--checkpoint-every", "checkpoint_every", "a checkpoint every K epochs (paper: 5)"),
    Flag("--train-subset", "train_subset", "train on the first N training images"),
    Flag("--permute-labels", "permute_labels", "control run: train on the labels permuted with this seed until fitted"),
    Flag("--lr", "lr", "initial learning rate (paper: 0.02)"),
    Flag("--batch-size", "batch_size", "mini-batch size (paper: 100)"),
    Flag("--weight-decay", "weight_decay"),
    Flag("--max-shift", "max_shift", "augmentation: random shifts up to this many pixels (0: none)"),
    Flag("--seed", "seed"),
)


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train FractalNet on the embedded world (or CIFAR-100) with checkpoints (resumes a killed run)",
        description="Trains FractalNet (Larsson et al. 2016) on the embedded world's training images (or CIFAR-100's "
        "train.bin with --images), writing checkpoints/epoch-NNNN.safetensors and train.json (lr schedule, train "
        "accuracy per epoch) to --out; rerun the same command to resume. Default: a reduced net (C=2, widths "
        "8-16-32, B=3) for 10 epochs, where meaning emerges on the world; --quick: the same net on 5000 images for 3 "
        "epochs, a check of the pipeline that stays at chance; --paper: the paper's CIFAR run (flags given override these).",
    )
    p.add_argument("--model", choices=("fractalnet",), default="fractalnet", help="architecture (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="pipeline check: 5000 images, 3 epochs (under 2 minutes; the world's net stays at chance)")
    preset.add_argument("--paper", action="store_true", help="the paper's CIFAR run: widths 64-512, C=3, B=5, 400 epochs")
    p.add_argument("--images", type=Path, help="CIFAR-100 binary: train.bin, or the folder holding it (default: the world)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    add_world_cache_flag(p, "the embedded world's cache (its training images are used)")
    defer_arguments(p, _add_train_flags)
    p.set_defaults(func=run_train)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from semguard.analysis.training_run import TrainConfig

    add_config_flags(p, TrainConfig, TRAIN_FLAGS)


def train_config(args: argparse.Namespace):
    from semguard.analysis.training_run import TrainConfig, paper_config, quick_config

    base = quick_config() if args.quick else paper_config() if getattr(args, "paper", False) else TrainConfig()
    return config_from_flags(args, base, TRAIN_FLAGS)


def training_images(args: argparse.Namespace):
    """uint8 (N, 32, 32, 3) images and labels: CIFAR-100's train.bin when --images is given, else the world's."""
    if args.images is not None:
        from semguard.analysis.real_data import read_cifar100_binary

        path = args.images / "train.bin" if args.images.is_dir() else args.images
        data = read_cifar100_binary(path)
        return data.images, data.labels
    from semguard.world import build_world

    world = build_world(cache_dir=args.world_cache, progress=not args.quiet)
    return world.train_images, world.train_labels


def run_train(args: argparse.Namespace) -> int:
    import torch
    from semguard.analysis.training_run import train_checkpoints

    torch.set_num_threads(1)  # bit-exact resumption, and the shared cores stay usable
    try:
        images, labels = training_images(args)
        record = train_checkpoints(images, labels, args.out, train_config(args), not args.quiet)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"semguard train: {err}") from None
    last = record["checkpoints"][-1]
    print(f"{record['epochs_done']} epochs, {len(record['checkpoints'])} checkpoints in {args.out}; "
          f"eval-mode train accuracy at epoch {last['epoch']}: {last['eval_train_accuracy']:.4f}")
    return 0


def add_analyze_commands(subparsers: argparse._SubParsersAction) -> None:
    analyze = subparsers.add_parser("analyze", help="training dynamics of 2 vs 2; architecture diagrams")
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
    from semguard.analysis.study_cli import add_two_vs_two_command  # Figure 1 for any subject

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
