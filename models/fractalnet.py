"""FractalNet (Larsson, Maire & Shakhnarovich 2016, "FractalNet: Ultra-Deep Neural Networks without
Residuals"), the network of the paper's training-dynamics study (its Figures 2 and 3).

Expansion rule (paper eq. 1-2): f_1(z) = conv(z); f_{C+1}(z) = join(f_C(f_C(z)), conv(z)), join =
element-wise mean. Flattened as the paper draws it (Figure 1): a block has C columns, column c
(0-based) is 2^c conv-BN-ReLU units deep, so the deepest is 2^(C-1); at depth step d every column
whose unit ends there is joined, and the join's output feeds all of them. B blocks, 2x2 max-pool
after each; CIFAR: C=3, B=5, widths (64, 128, 256, 512, 512), 5 x 2^2 = 20 conv layers deep (C=4: 40).

Drop-path (paper 3.1), training only, one draw per mini-batch: with probability `global_fraction`
"global" (one column, the same in every block, is the whole network), else "local" (each join input
dropped with probability `local_drop`, at least one kept). In eval mode every join averages all its
inputs, so the network is deterministic.

    model = FractalNet(FractalNetConfig(num_classes=100))   # (B, 3, 32, 32) in [0, 1] -> (B, 100)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from semguard.models.factory import ModelSpec, create_model, register_model_builder
from semguard.models.graph import is_relu, trace_graph
from semguard.models.presets import PRESETS, LayerInfo

PRESET_NAME = "fractalnet"  # the CIFAR configuration (FractalNetConfig()); other configs: fractalnet_layers(config)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # as WorldNet: BatchNorm follows, only the scale matters


@dataclass(frozen=True)
class FractalNetConfig:
    num_classes: int = 100
    widths: tuple[int, ...] = (64, 128, 256, 512, 512)  # channels per block (paper, CIFAR); len = B
    columns: int = 3  # C: block depth 2^(C-1) conv layers; C=3, B=5 is the paper's 20-layer CIFAR net (C=4: 40 layers)
    dropout: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4)  # per block (paper, "+dropout & drop-path")
    local_drop: float = 0.15  # paper 4: local drop-path rate
    global_fraction: float = 0.5  # paper 4: half the mini-batches global drop-path

    def __post_init__(self) -> None:
        if self.columns < 1:
            raise ValueError(f"columns: expected >= 1, got {self.columns}")
        if not self.widths or len(self.dropout) != len(self.widths):
            raise ValueError(f"dropout: expected one rate per block ({len(self.widths)}), got {len(self.dropout)}")
        if not 0 <= self.local_drop < 1 or not 0 <= self.global_fraction <= 1:
            raise ValueError(f"local_drop in [0, 1) and global_fraction in [0, 1], got {self.local_drop}, {self.global_fraction}")

    @classmethod
    def from_json(cls, raw: dict) -> FractalNetConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


# The reduced configuration for the world (32x32, 100 classes) on one CPU core: B=3 blocks (32 -> 4 pixels),
# a quarter of the paper's widths, no dropout (drop-path stays), C=2 (6 conv layers deep). C=3, the paper's
# column count (`semguard train --columns 3`), costs 2.4x per epoch and leaves the world's chance plateau later.
WORLD_CONFIG = FractalNetConfig(widths=(8, 16, 32), columns=2, dropout=(0.0, 0.0, 0.0))


class ConvUnit(nn.Module):
    """conv3x3 - BN - ReLU (- dropout): one unit of a column."""

    def __init__(self, c_in: int, c_out: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.relu(self.bn(self.conv(x))))


class FractalBlock(nn.Module):
    """C columns; column c holds 2^c units. (B, c_in, H, W) -> (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, columns: int, dropout: float) -> None:
        super().__init__()
        self.n_columns = columns
        self.columns = nn.ModuleList(
            nn.ModuleList(ConvUnit(c_in if j == 0 else c_out, c_out, dropout) for j in range(2 ** c)) for c in range(columns)
        )
        self.out = nn.Identity()  # a named node for the block's last join (its output)

    def forward(self, x: torch.Tensor, plan: tuple) -> torch.Tensor:
        if plan[0] == "global":  # one column is the whole block: the others would be computed only to be dropped
            for unit in self.columns[plan[1]]:
                x = unit(x)
            return self.out(x)
        n = self.n_columns
        inputs = [x] * n
        joined = x
        for d in range(1, 2 ** (n - 1) + 1):
            ending = [c for c in range(n) if d % 2 ** (n - 1 - c) == 0]  # columns whose unit ends at step d
            ys = [self.columns[c][d // 2 ** (n - 1 - c) - 1](inputs[c]) for c in ending]
            joined = _join(ys, ending, plan) if len(ys) > 1 else ys[0]
            for c in ending:
                inputs[c] = joined
        return self.out(joined)


def _join(ys: list[torch.Tensor], columns: list[int], plan: tuple) -> torch.Tensor:
    """Element-wise mean of the kept inputs; plan: ("all",) or ("local", drop rate per input)."""
    if plan[0] == "local":
        keep = torch.rand(len(ys)) >= plan[1]
        if not keep.any():
            keep[torch.randint(len(ys), (1,))] = True
        ys = [y for y, k in zip(ys, keep.tolist()) if k]
    return torch.stack(ys).mean(0) if len(ys) > 1 else ys[0]


class FractalNet(nn.Module):
    """(B, 3, H, W) float32 in [0, 1] -> (B, num_classes) logits."""

    def __init__(self, config: FractalNetConfig = FractalNetConfig()) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        c_ins = (3, *config.widths[:-1])
        self.blocks = nn.ModuleList(FractalBlock(a, b, config.columns, p) for a, b, p in zip(c_ins, config.widths, config.dropout))
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)  # 1x1 already for CIFAR's 5 blocks; reduced nets keep a spatial map
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(config.widths[-1], config.num_classes)

    def drop_path_plan(self) -> tuple:
        """This mini-batch's drop-path draw (torch's global RNG): global column or local rate; none in eval."""
        c = self.config
        if not self.training or c.columns == 1:
            return ("all",)
        if torch.rand(()).item() < c.global_fraction:
            return ("global", int(torch.randint(c.columns, ())))
        return ("local", c.local_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.drop_path_plan()
        x = (x - self.mean) / self.std
        for block in self.blocks:
            x = self.pool(block(x, plan))  # (B, w_b, H / 2^b, W / 2^b)
        return self.fc(self.flatten(self.gap(x)))


def fractalnet_layers(config: FractalNetConfig = FractalNetConfig()) -> list[LayerInfo]:
    """Every ReLU and each block's join output (`blocks.i.out`), in execution order, grouped as block1..blockB."""
    return list(_layers_json(json.dumps(asdict(config), sort_keys=True)))


@lru_cache(maxsize=8)
def _layers_json(config_json: str) -> tuple[LayerInfo, ...]:
    with torch.device("meta"):  # structure only: tracing needs no weights
        model = FractalNet(FractalNetConfig.from_json(json.loads(config_json))).eval()
    trace = trace_graph(model)
    names = [n for n, node in trace.names.items() if is_relu(node, model) or n.endswith(".out")]
    return tuple(LayerInfo(n, f"block{int(n.split('.')[1]) + 1}", i) for i, n in enumerate(names))


PRESETS.register_lazy(PRESET_NAME, fractalnet_layers)


@register_model_builder("fractalnet")
def build_fractalnet(**config) -> FractalNet:
    return FractalNet(FractalNetConfig.from_json(config))


def load_fractalnet(path: str | Path) -> FractalNet:
    """A FractalNet in eval mode from a checkpoint written by `semguard train` (config in the metadata)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("semguard", "{}"))
        if meta.get("format") != "semguard.checkpoint/1":
            raise ValueError(f"path: {path} is not a semguard training checkpoint")
        state = {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
    return create_model(ModelSpec("fractalnet", meta["config"], module="semguard.models.fractalnet"), weights=state,
                        what=f"path {path}")
