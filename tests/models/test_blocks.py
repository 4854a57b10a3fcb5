"""`--layers blocks`: each block's output for architectures made of blocks (models.blocks, issue 27)."""
import pytest
import torch
from torch import nn

from semguard.models.blocks import block_modules
from semguard.detector.layers import LayerTap


class SamePadConv(nn.Conv2d):
    """A conv layer of a package's own class (EfficientNet's same padding): a layer, not a block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x):
        return super().forward(self.pad(x))


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.Hardswish()

    def forward(self, x):
        return x + self.act(self.conv(x))


class Branches(nn.Module):
    """Inception-like: two blocks run side by side, not in sequence (tapped as one block)."""

    def __init__(self, width: int):
        super().__init__()
        self.left, self.right = Residual(width), Residual(width)

    def forward(self, x):
        return self.left(x) * self.right(x)


class Encoder(nn.Module):
    """A ViT-like stage: blocks run in sequence from one container (its blocks are tapped, not it)."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(Residual(width), Residual(width), Residual(width))
        self.norm = nn.BatchNorm2d(width)

    def forward(self, x):
        return self.norm(self.layers(x))


class Aux(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(width, 2, 1), nn.Linear(2, 2)


class Blocky(nn.Module):
    def __init__(self, width: int = 4, classes: int = 5):
        super().__init__()
        self.stem = SamePadConv(3, width, 3)
        self.stages = nn.ModuleList([nn.Sequential(Residual(width), Residual(width)), nn.Sequential(Branches(width))])
        self.encoder = Encoder(width)
        self.aux = Aux(width)  # never run by forward (Inception's training-only head)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.fc(self.encoder(x).mean((2, 3)))


def test_blocks_are_the_outermost_own_modules_the_graph_runs():
    model = Blocky().eval()
    blocks = block_modules(model)
    assert blocks == ["stages.0.0", "stages.0.1", "stages.1.0", "encoder.layers.0", "encoder.layers.1",
                      "encoder.layers.2"]
    tap = LayerTap(model, blocks)
    x = torch.rand(2, 3, 8, 8)
    out = tap(x)
    with torch.no_grad():  # each tap is the block's output
        stem = model.stem(x)
        first = model.stages[0][0](stem)
        want = model.encoder.layers[:2](model.stages[1](model.stages[0](stem)))
    torch.testing.assert_close(out.acts["stages.0.0"], first.flatten(1))
    torch.testing.assert_close(out.acts["encoder.layers.1"], want.flatten(1))


def test_a_model_without_blocks_is_told_what_to_do():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"Sequential is not made of blocks .* leave --layers out"):
        block_modules(plain)


def test_subject_with_layers_blocks(tmp_path, monkeypatch, capsys):
    """--layers blocks on a torchvision ResNet-18 given as a user's entry point: its 8 BasicBlocks."""
    from semguard.subject.core import SubjectSpec, load_subject
    from tests.subject.fixtures import write_subject_assets

    assets = write_subject_assets(tmp_path / "assets")
    (tmp_path / "blockmodels.py").write_text("import torchvision\n\ndef resnet():\n"
                                             "    return torchvision.models.resnet18(num_classes=6), (0.5,) * 3, (0.25,) * 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = SubjectSpec(**{**assets.spec_kwargs(), "model": None, "weights": None, "model_entry": "blockmodels:resnet",
                          "layers": ("blocks",)}, world_cache=tmp_path / "world")
    subject = load_subject(spec, progress=False)
    assert subject.layers == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert "tapping the outputs of 8 blocks of blockmodels:resnet, layer1.0 .. layer4.1" in capsys.readouterr().err
    acts = LayerTap(subject.model, subject.layers)(subject.images.load([0, 1])).acts
    assert acts["layer4.1"].shape[0] == 2 and len(acts) == 8
