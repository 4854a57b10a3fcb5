"""`semguard train`: train FractalNet with checkpoints for the training-dynamics study (paper Figures 2-3).

Paper setting (Larsson et al. 2016, CIFAR; `paper_config`): SGD, momentum 0.9, batch 100, lr 0.02 divided
by 10 each time the remaining epochs halve (epochs 200, 300, 350, 375 of 400), 2 vs 2 every 5 epochs.
The default is a reduced net for the world with the same schedule shape over 20 epochs.
The permuted-label control trains the same net on a fixed random relabelling of a subset until
it fits it (the paper: 99.9% training accuracy).

Files in `out`: `checkpoints/epoch-NNNN.safetensors` (model `model.*`, optimizer `optim.*`, config
and epoch in one metadata key, so the bytes depend on the weights only) and `train.json` (settings,
lr schedule, accuracy per epoch, checkpoint list), both written atomically, the JSON after the
checkpoint. A killed run resumes from its last checkpoint: epoch e's randomness (batch order,
drop-path draws) comes from torch.manual_seed(seed, e) at the epoch's start, so a resumed run
repeats an uninterrupted one bit for bit (one torch thread).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from semguard.models.fractalnet import WORLD_CONFIG, FractalNet, FractalNetConfig
from semguard.models.inputs import as_model_input, predict, random_shift

from semguard.files import atomic_path, write_json_atomic

FORMAT = "semguard.checkpoint/1"


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the reduced FractalNet on the world (what trains there in minutes, with WorldNet's recipe:
    nesterov SGD at lr 0.1, weight decay, random shifts); paper_config(): Larsson et al.'s CIFAR run."""

    model: FractalNetConfig = WORLD_CONFIG
    epochs: int = 10  # the world's loss stays at chance for ~4 epochs at lr 0.1 (measured), so 5 at lr 0.1; permuted: the most to try
    checkpoint_every: int = 1  # paper: 2 vs 2 every 5 of 400 epochs
    batch_size: int = 128  # paper: 100
    lr: float = 0.1  # paper: 0.02; divided by 10 whenever the remaining epochs halve (paper's schedule)
    momentum: float = 0.9  # paper
    nesterov: bool = True  # as WorldNet's training (world/train.py); paper: plain momentum
    weight_decay: float = 5e-4  # as WorldNet's training
    max_shift: int = 3  # augmentation: random translation by up to this many pixels (edges replicated); 0: none
    train_subset: int | None = None  # first N training images in a class-balanced order; None: all
    permute_labels: int | None = None  # seed of the fixed label permutation (control run); None: true labels
    target_accuracy: float = 0.999  # permuted run: stop once eval-mode accuracy on its subset reaches this
    eval_images: int = 2000  # training images scored in eval mode at each checkpoint
    seed: int = 0


def quick_config(**overrides) -> TrainConfig:
    """`--quick`, a check of the whole pipeline: the default net on 5000 images (50 per class), 3 epochs. It stays
    on the world's chance plateau, which every net tried there needs ~150k training images to leave (measured)."""
    return replace(TrainConfig(epochs=3, train_subset=5000, eval_images=1000), **overrides)


def paper_config(**overrides) -> TrainConfig:
    """`--paper`: Larsson et al.'s CIFAR-100 run (widths 64-512, C=3, B=5; 400 epochs, batch 100, lr 0.02, plain
    momentum; no augmentation, as their C100 column), 2 vs 2 every 5 epochs as in the semantics paper."""
    return replace(TrainConfig(model=FractalNetConfig(), epochs=400, checkpoint_every=5, batch_size=100, lr=0.02,
                               nesterov=False, weight_decay=0.0, max_shift=0), **overrides)


def lr_schedule(config: TrainConfig) -> list[float]:
    """lr per epoch (0-based): lr / 10^k after the k-th halving of the remaining epochs."""
    drops, rest = [], config.epochs
    while rest > 1:
        rest //= 2
        drops.append(config.epochs - rest)
    return [config.lr * 0.1 ** sum(e >= d for d in drops) for e in range(config.epochs)]


def training_set(images: np.ndarray, labels: np.ndarray, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """The (subset of the) training images and the labels to fit: true, or a fixed permutation of them."""
    if config.train_subset is not None:
        if not 1 <= config.train_subset <= len(labels):
            raise ValueError(f"train_subset: expected 1..{len(labels)}, got {config.train_subset}")
        images, labels = images[: config.train_subset], labels[: config.train_subset]  # the world's order cycles classes
    if config.permute_labels is not None:
        labels = np.random.default_rng(config.permute_labels).permutation(labels)
    return images, np.asarray(labels, dtype=np.int64)


def _epoch_seed(config: TrainConfig, epoch: int) -> int:
    return config.seed * 1_000_003 + epoch


def _batch_input(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), randomly shifted, channels-last (faster convs on CPU)."""
    return as_model_input(random_shift(images, max_shift, rng)).contiguous(memory_format=torch.channels_last)


def checkpoint_path(out: Path, epoch: int) -> Path:
    return Path(out) / "checkpoints" / f"epoch-{epoch:04d}.safetensors"


def save_checkpoint(path: Path, model: FractalNet, opt: torch.optim.Optimizer, epoch: int) -> None:
    state = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            state[f"optim.{i}.momentum_buffer"] = buf.detach().contiguous().clone()
    meta = {"semguard": json.dumps({"format": FORMAT, "model": "fractalnet", "config": asdict(model.config),
                                    "epoch": epoch}, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_checkpoint(path: Path, model: FractalNet, opt: torch.optim.Optimizer) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(opt.param_groups[0]["params"]):
        if f"optim.{i}.momentum_buffer" in tensors:
            opt.state[p]["momentum_buffer"] = tensors[f"optim.{i}.momentum_buffer"].clone()


def _settings(config: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def train_checkpoints(images: np.ndarray, labels: np.ndarray, out: str | Path, config: TrainConfig,
                      progress: bool = False) -> dict:
    """Train on uint8 (N, H, W, 3) images with checkpoints in `out` (resuming what is there); returns train.json."""
    out = Path(out)
    x_all, y_all = training_set(images, labels, config)
    y = torch.from_numpy(y_all)
    torch.manual_seed(config.seed)
    model = FractalNet(config.model).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                          weight_decay=config.weight_decay)
    schedule = lr_schedule(config)
    record = _resume(out, config, model, opt, schedule)
    eval_idx = np.arange(len(y_all)) if config.permute_labels is not None else np.arange(min(len(y_all), config.eval_images))
    if not record["checkpoints"]:  # epoch 0: the initialisation, the left edge of Figure 2
        _checkpoint(out, model, opt, 0, record, x_all[eval_idx], y_all[eval_idx])
    steps = math.ceil(len(y_all) / config.batch_size)
    start, first = time.perf_counter(), record["epochs_done"]
    while record["epochs_done"] < config.epochs and not record["stopped"]:
        epoch = record["epochs_done"]  # 0-based epoch being trained
        torch.manual_seed(_epoch_seed(config, epoch))
        order = torch.randperm(len(y_all))
        shift_rng = np.random.default_rng([config.seed, epoch])
        for group in opt.param_groups:
            group["lr"] = schedule[epoch]
        model.train()
        correct = 0
        for b in range(steps):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            logits = model(_batch_input(x_all[idx.numpy()], config.max_shift, shift_rng))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == y[idx]).sum())
        record["epochs_done"] = epoch + 1
        record["train_accuracy"].append(correct / len(y_all))
        if progress:
            per_epoch = (time.perf_counter() - start) / (epoch + 1 - first)
            print(f"epoch {epoch + 1}/{config.epochs}: train accuracy {correct / len(y_all):.4f} (lr {schedule[epoch]:g}; "
                  f"{per_epoch:.0f} s/epoch, ETA {per_epoch * (config.epochs - epoch - 1) / 60:.1f} min)", flush=True)
        fitted = False
        model.eval()  # predict() below must not touch BatchNorm's running statistics
        if config.permute_labels is not None:
            acc = float((predict(model, x_all) == y_all).mean())
            record["eval_train_accuracy_by_epoch"].append(acc)
            fitted = acc >= config.target_accuracy
        if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs or fitted:
            record["stopped"] = fitted
            _checkpoint(out, model, opt, epoch + 1, record, x_all[eval_idx], y_all[eval_idx])
    return record


def _checkpoint(out: Path, model, opt, epoch: int, record: dict, x_eval: np.ndarray, y_eval: np.ndarray) -> None:
    save_checkpoint(checkpoint_path(out, epoch), model, opt, epoch)
    acc = float((predict(model, x_eval) == y_eval).mean())
    record["checkpoints"].append({"epoch": epoch, "file": checkpoint_path(out, epoch).name, "eval_train_accuracy": acc})
    write_json_atomic(out / "train.json", record)


def _resume(out: Path, config: TrainConfig, model, opt, schedule: list[float]) -> dict:
    """train.json's record, the model and optimizer at its last checkpoint; a fresh record if none."""
    path = out / "train.json"
    fresh = {"format": "semguard.train/1", "model": "fractalnet", "settings": _settings(config), "lr_schedule": schedule,
             "rng": "torch.manual_seed(seed * 1000003 + epoch) at each epoch's start", "epochs_done": 0,
             "stopped": False, "train_accuracy": [], "eval_train_accuracy_by_epoch": [], "checkpoints": []}
    if not path.exists():
        return fresh
    record = json.loads(path.read_text())
    if record.get("settings") != fresh["settings"]:
        raise ValueError(f"out: {out} holds a training run with other settings; use another --out")
    if record["checkpoints"]:
        last = record["checkpoints"][-1]["epoch"]
        load_checkpoint(checkpoint_path(out, last), model, opt)
        record["epochs_done"] = last  # epochs after the last checkpoint are trained again
        record["train_accuracy"] = record["train_accuracy"][:last]
        record["eval_train_accuracy_by_epoch"] = record["eval_train_accuracy_by_epoch"][:last]
    return record
