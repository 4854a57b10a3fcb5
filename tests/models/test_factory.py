"""models.factory (create_model, weights) and the torchvision builders of models.normalize."""
import json
from dataclasses import asdict

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from semguard.models.factory import (
    ModelSpec, ModelSpecError, OtherClassCount, UntrustedModelCode, create_model, inner_network, known_model_builders,
)
from semguard.models.fractalnet import FractalNetConfig, load_fractalnet
from semguard.models.graph import graph_node_names
from semguard.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalized, build_torchvision_model, imagenet_classifier
from semguard.models.presets import preset_layers


def test_imagenet_classifier_uses_imagenet_statistics():
    model = imagenet_classifier("resnet18", num_classes=7)
    assert isinstance(model, Normalized) and not model.training
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(model.std.flatten(), torch.tensor(IMAGENET_STD))
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 7)


# --------------------------------------------------------------------------- weights


def test_weights_round_trip_torch_and_safetensors(tmp_path):
    torch.manual_seed(7)
    source = torchvision.models.squeezenet1_1(weights=None, num_classes=10).eval()  # small: 0.7M parameters
    state = source.state_dict()
    torch.save(state, tmp_path / "w.pth")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "checkpoint.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    for name in ["w.pth", "checkpoint.pth", "w.safetensors"]:
        model = build_torchvision_model("squeezenet1_1", tmp_path / name, num_classes=10)
        assert not model.training
        torch.testing.assert_close(model(x), source(x))


def test_weights_errors(tmp_path):
    torch.save(torchvision.models.squeezenet1_1(weights=None, num_classes=10).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"weights_path .*missing.pth: cannot be read as weights \(.*no such file"):
        build_torchvision_model("squeezenet1_1", tmp_path / "missing.pth")
    with pytest.raises(OtherClassCount, match=r"squeezenet1_1 weights for 10 classes \(classifier.1.weight \(10, 512, 1, 1\)\), "
                                              r"but the model is built for 1000"):
        build_torchvision_model("squeezenet1_1", tmp_path / "w.pth")
    torch.save({"features.0.weight": torch.zeros(1), "extra": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys .*1 unexpected keys \['extra'\]"):
        build_torchvision_model("squeezenet1_1", tmp_path / "partial.pth")
    torch.save({"weights": nn.Module}, tmp_path / "pickled.pth")  # a class: refused by weights_only
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        build_torchvision_model("squeezenet1_1", tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match=r"arch: .*resnet50"):
        build_torchvision_model("resnet5O")


def test_inception_weights_with_or_without_aux_head(tmp_path):
    torch.manual_seed(8)
    with_aux = torchvision.models.inception_v3(weights=None, aux_logits=True, num_classes=10, init_weights=False)
    state = with_aux.state_dict()
    save_file(state, str(tmp_path / "aux.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("AuxLogits.")}, str(tmp_path / "noaux.safetensors"))
    x = torch.rand(1, 3, 75, 75)
    outputs = []
    for name in ["aux.safetensors", "noaux.safetensors"]:
        model = build_torchvision_model("inception_v3", tmp_path / name, num_classes=10)
        assert model.AuxLogits is None and not model.aux_logits and model.transform_input
        assert set(preset_layers("inception_v3")) <= set(graph_node_names(model))
        outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1])


# --------------------------------------------------------------------------- one factory for every caller


def test_create_model_loads_a_wrappers_weights_into_its_inner_network(tmp_path):
    """A weights file is the bare network's: Normalized's mean/std buffers are not in it."""
    torch.manual_seed(3)
    bare = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    save_file(bare.state_dict(), str(tmp_path / "w.safetensors"))
    spec = ModelSpec("torchvision_normalized", {"arch": "resnet18", "num_classes": 4, "mean": [0.5] * 3,
                                                "std": [0.25] * 3, "model_kwargs": {}}, "semguard.models.normalize")
    model = create_model(spec, weights=tmp_path / "w.safetensors", what="--weights")
    assert isinstance(model, Normalized) and inner_network(model) is model.model and not model.training
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), bare((x - 0.5) / 0.25))
    with pytest.raises(OtherClassCount, match=r"--weights .*w.safetensors: resnet18 weights for 4 classes"):
        create_model(ModelSpec(spec.builder, {**spec.kwargs, "num_classes": 7}, spec.module), weights=tmp_path / "w.safetensors",
                     what="--weights")


def test_a_checkpoint_builds_through_the_factory(tmp_path):
    """load_fractalnet reads a `semguard train` checkpoint: the spec from its metadata, the weights under model."""
    config = FractalNetConfig(num_classes=3, widths=(4, 8), columns=2, dropout=(0.0, 0.0))
    torch.manual_seed(0)
    source = create_model(ModelSpec("fractalnet", json.loads(json.dumps(asdict(config)))))
    meta = {"format": "semguard.checkpoint/1", "config": json.loads(json.dumps(asdict(config)))}
    save_file({f"model.{k}": v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "c.safetensors"),
              metadata={"semguard": json.dumps(meta)})
    loaded = load_fractalnet(tmp_path / "c.safetensors")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), source(x))
    assert loaded.config == config


def test_the_library_builders_are_known_without_importing_their_modules():
    assert {"torchvision", "torchvision_normalized", "timm_normalized", "entry_point", "worldnet",
            "fractalnet"} <= set(known_model_builders())


def test_spec_errors_name_the_field():
    with pytest.raises(ModelSpecError, match=r"field model.kwargs.weights: not an argument a file may give"):
        create_model(ModelSpec("torchvision", {"arch": "resnet18", "weights": "IMAGENET1K_V1"}))
    with pytest.raises(ModelSpecError, match="model.builder 'nope' is not registered"):
        create_model(ModelSpec("nope"))
    with pytest.raises(UntrustedModelCode, match="--trust-model-code"):
        create_model(ModelSpec("entry_point", {"entry": "os:getcwd"}))
