"""`semguard train`: FractalNet on the embedded world or CIFAR-100, with checkpoints for the paper's
training-dynamics study (`semguard analyze training`). Only argparse here: torch loads when it runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from semguard.config_flags import Flag, add_world_cache_flag, config_from_flags, defer_config_flags

# Types and defaults come from models.trainer.TrainConfig (imported on first use).
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


def register(subparsers: argparse._SubParsersAction) -> None:
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
    defer_config_flags(p, "semguard.models.trainer:TrainConfig", TRAIN_FLAGS)
    p.set_defaults(func=run_train)


def train_config(args: argparse.Namespace):
    from semguard.models.trainer import TrainConfig, paper_config, quick_config

    base = quick_config() if args.quick else paper_config() if getattr(args, "paper", False) else TrainConfig()
    return config_from_flags(args, base, TRAIN_FLAGS)


def training_images(args: argparse.Namespace):
    """uint8 (N, 32, 32, 3) images and labels: CIFAR-100's train.bin when --images is given, else the world's."""
    if args.images is not None:
        from semguard.subject.real_data import read_cifar100_binary

        path = args.images / "train.bin" if args.images.is_dir() else args.images
        data = read_cifar100_binary(path)
        return data.images, data.labels
    from semguard.world import build_world

    world = build_world(cache_dir=args.world_cache, progress=not args.quiet)
    return world.train_images, world.train_labels


def run_train(args: argparse.Namespace) -> int:
    import torch
    from semguard.models.trainer import train_checkpoints

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
