"""A guard bundle of a small random WorldNet, whose builder a fresh process finds through the
bundle's `model.module` (semguard.models.worldnet) with no test code imported."""
from pathlib import Path

import numpy as np
import torch

from semguard.models.worldnet import worldnet_spec
from semguard.detector.calibrate import CalibrationConfig
from semguard.detector.guard import calibrate_guard
from semguard.models.worldnet import WorldNet, WorldNetConfig, worldnet_layers

N_CLASSES = 6
IMAGE_SIZE = 16


def write_worldnet_bundle(out: Path) -> Path:
    torch.manual_seed(0)
    model = WorldNet(WorldNetConfig(num_classes=N_CLASSES, widths=(8, 8, 16), blocks=(1, 1, 1))).eval()
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(0, N_CLASSES, (90,), generator=gen)
    images = torch.rand(N_CLASSES, 3, 1, 1, generator=gen)[src] + 0.2 * torch.rand(90, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    with torch.no_grad():  # a least-squares head on the random features, so predictions spread over the classes
        feats = model.flatten(model.pool(model.stage3(model.stage2(model.stage1(model.stem(images))))))
        x = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
        w = torch.linalg.lstsq(x, 10.0 * torch.nn.functional.one_hot(src, N_CLASSES).double()).solution
        model.fc.weight.copy_(w[:-1].T.float())
        model.fc.bias.copy_(w[-1].float())
        images = images.clamp(0, 1)
        labels = model(images).argmax(1).numpy()  # the model's own predictions are the truth
    words = np.random.default_rng(2).normal(size=(N_CLASSES, 8)).astype(np.float32)
    layers = [info.name for info in worldnet_layers(model.config)][-3:]
    calibrate_guard(model, worldnet_spec(model), layers, [f"c{i}" for i in range(N_CLASSES)], words, images,
                    labels, out, config=CalibrationConfig(k=50, per_concept=2, target_fpr=0.2, batch_size=32))
    return out
