"""models.presets (the paper's layer presets, computed from torchvision's graphs) and models.graph."""
import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

from semguard.detector.layers import LayerTap
from semguard.models import presets
from semguard.models.graph import activation_nodes, graph_node_names, relu_nodes
from semguard.models.normalize import build_torchvision_model
from semguard.models.presets import LayerInfo, preset_info, preset_layers, register_preset


def eval_nodes(model: nn.Module) -> list[str]:
    return get_graph_node_names(model)[1]


# --------------------------------------------------------------------------- presets on real graphs


def test_resnet50_preset_is_the_49_relus_of_16_blocks():
    model = torchvision.models.resnet50(weights=None)
    nodes = eval_nodes(model)
    relus = [n for n in nodes if re.search(r"(^|\.)relu(_\d+)?$", n)]
    info = preset_info("resnet50")
    assert [i.name for i in info] == relus
    assert len(info) == 49
    blocks = [i.block for i in info]
    assert blocks[0] == "stem" and info[0].name == "relu"
    assert len(set(blocks)) == 1 + 16
    assert all(blocks.count(b) == 3 for b in set(blocks) - {"stem"})
    assert info[1].name == "layer1.0.relu" and info[-1].name == "layer4.2.relu_2"
    assert [i.depth for i in info] == list(range(49))


def test_inception_v3_preset_is_94_relus_plus_11_mixed_outputs():
    model = build_torchvision_model("inception_v3")  # random init, aux head dropped, eval graph
    assert model.AuxLogits is None
    nodes = eval_nodes(model)
    relus = [n for n in nodes if n.endswith(".relu")]
    mixed = sorted({n.split(".")[0] for n in nodes if n.startswith("Mixed_")})
    mixed_outputs = [[n for n in nodes if n.startswith(m + ".")][-1] for m in mixed]
    info = preset_info("inception_v3")
    names = [i.name for i in info]
    assert len(relus) == 94 and len(mixed_outputs) == 11 and len(info) == 105
    assert set(names) == set(relus) | set(mixed_outputs)
    assert names == [n for n in nodes if n in set(names)]  # depth order = graph order
    assert mixed_outputs[-1] == "Mixed_7c.cat_2" and names[-1] == "Mixed_7c.cat_2"
    assert {i.block for i in info if i.name in mixed_outputs} == set(mixed)
    assert all(i.block == i.name.split(".")[0] for i in info)


def test_vgg16_preset_is_its_relus():
    with torch.device("meta"):  # the graph only: 138M parameters need not be initialised
        model = torchvision.models.vgg16(weights=None)
    modules = dict(model.named_modules())
    relus = [n for n in eval_nodes(model) if isinstance(modules.get(n), nn.ReLU)]
    assert preset_layers("vgg16") == relus and len(relus) == 15
    blocks = [i.block for i in preset_info("vgg16")]
    assert blocks == ["conv1"] * 2 + ["conv2"] * 2 + ["conv3"] * 3 + ["conv4"] * 3 + ["conv5"] * 3 + ["classifier"] * 2


def test_graph_node_names_equal_torchvisions():
    model = torchvision.models.resnet18(weights=None)
    assert graph_node_names(model) == eval_nodes(model)


# --------------------------------------------------------------------------- registry


@pytest.fixture
def fresh_registry():
    saved = dict(presets.PRESETS)
    yield
    presets.PRESETS.clear()
    presets.PRESETS.update(saved)


def test_register_preset_validates(fresh_registry):
    good = [LayerInfo("a", "b1", 0), LayerInfo("b", "b1", 1)]
    register_preset("tiny", good)
    register_preset("tiny", list(good))  # identical again: fine (module reload)
    assert preset_layers("tiny") == ["a", "b"]
    with pytest.raises(ValueError, match="already registered"):
        register_preset("tiny", good[:1])
    register_preset("tiny", good[:1], overwrite=True)
    assert preset_layers("tiny") == ["a"]
    with pytest.raises(ValueError, match="repeats layer names"):
        register_preset("dup", [LayerInfo("a", "b", 0), LayerInfo("a", "b", 1)])
    with pytest.raises(ValueError, match="depth must equal"):
        register_preset("order", [LayerInfo("a", "b", 1)])
    with pytest.raises(ValueError, match="at least one"):
        register_preset("empty", [])
    with pytest.raises(ValueError, match="expected LayerInfo"):
        register_preset("bad", ["a"])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match=r"known layer presets: .*resnet50"):
        preset_layers("resnet51")


class _MixedActivations(nn.Module):
    """Each activation family a real classifier uses, as a module, a functional call and a written-out swish."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.relu6 = nn.ReLU6(inplace=True)  # MobileNet / EfficientNet-Lite
        self.gelu = nn.GELU()  # ConvNeXt
        self.silu = nn.SiLU()  # EfficientNet
        self.hswish = nn.Hardswish()  # MobileNetV3
        self.gate = nn.Hardsigmoid()  # a squeeze-excitation gate: not a representation
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu6(self.stem(x))
        x = self.silu(self.gelu(x))
        x = self.hswish(x) * self.gate(x.mean((2, 3), keepdim=True))
        x = nn.functional.leaky_relu(x, 0.1)
        x = nn.functional.mish(x)
        x = x * torch.sigmoid(x)  # Swish written out
        return self.head(x.mean((2, 3)))


def test_activation_nodes_find_every_activation_family_and_no_gate():
    model = _MixedActivations().eval()
    found = activation_nodes(model)
    assert list(found.values()) == ["ReLU6", "GELU", "SiLU", "Hardswish", "leaky_relu", "mish", "swish"]
    assert relu_nodes(model) == []  # what the default was before: nothing to tap
    out = LayerTap(model, list(found))(torch.rand(2, 3, 8, 8))
    assert [a.shape for a in out.acts.values()] == [(2, 4 * 6 * 6)] * 7
