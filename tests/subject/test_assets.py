"""A subject from real-format assets (semguard.subject.assets): models, conventions, bad input, bundles."""
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from semguard.detector.bundle import read_bundle
from semguard.models.factory import UntrustedModelCode, create_model
from semguard.detector.calibrate import CalibrationConfig
from semguard.detector.guard import calibrate_guard
from semguard.models.graph import relu_nodes
from semguard.models.normalize import Normalized
from semguard.subject.assets import torchvision_convention
from semguard.subject.core import SubjectSpec, load_subject
from semguard.subject.flags import read_subject_toml
from tests.subject.fixtures import INPUT_SIZE, write_subject_assets

ENTRY_MODULE = '''
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self, outputs=6):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, outputs)

    def forward(self, x):
        return self.fc(torch.relu(self.act(self.conv(x))).mean((2, 3)))

def tiny():
    torch.manual_seed(0)
    return Tiny(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)   # a module taking normalised images, its mean, std

def four():
    return Tiny(4)

def resnet():
    import torchvision
    return torchvision.models.resnet18(num_classes=6), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_subject_assets(tmp_path_factory.mktemp("assets"))


def spec_of(assets, **changes) -> SubjectSpec:
    return SubjectSpec(**{**assets.spec_kwargs(), **changes}, world_cache=assets.root / ".semguard" / "world")


@pytest.fixture(scope="module")
def subject(assets):
    return load_subject(spec_of(assets), progress=False)


@pytest.fixture
def entry(assets, monkeypatch, tmp_path):
    """A user's model module on the path, under a name of its own per test (imports are cached)."""
    name = f"user_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(ENTRY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_torchvision_model_wrapped_with_its_transform_classes_and_vectors(assets, subject, capsys):
    load_subject(spec_of(assets), progress=False)
    assert ("5 of 6 classes have a word vector (4 by a word, 1 by a phrase token, 0 by the mean of their words); "
            "unmatched left out of the semantic analyses: tiger shark"
            in capsys.readouterr().err)
    assert subject.name == "resnet18" and isinstance(subject.model, Normalized) and not subject.model.training
    assert next(subject.model.parameters()).device.type == "cpu"
    assert subject.model_spec.builder == "torchvision_normalized" and subject.model_spec.kwargs["num_classes"] == 6
    assert subject.layers == relu_nodes(subject.model.model)  # no preset for resnet18: its ReLUs
    assert subject.classes == ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray"]
    assert subject.matched.tolist() == [True, True, True, False, True, True]
    assert subject.word_vectors.shape == (6, 16) and not subject.word_vectors[3].any()
    assert len(subject.images) == 30 and subject.source_weights == str(assets.weights)
    images = subject.images.load(np.arange(4))
    assert images.shape == (4, 3, INPUT_SIZE, INPUT_SIZE)
    plain = torchvision.models.resnet18(num_classes=6).eval()
    plain.load_state_dict(torch.load(assets.weights, weights_only=True))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(subject.model(images), plain((images - mean) / std))


def test_toml_and_glove_give_the_same_subject(assets, subject):
    from_toml = load_subject(SubjectSpec(**read_subject_toml(assets.toml), world_cache=assets.root / ".semguard/world"),
                             progress=False)
    assert from_toml.classes == subject.classes and from_toml.layers == subject.layers
    np.testing.assert_array_equal(from_toml.images.labels, subject.images.labels)
    glove = load_subject(spec_of(assets, vectors=assets.glove), progress=False)
    np.testing.assert_allclose(glove.word_vectors, subject.word_vectors, atol=1e-6)


def test_architecture_conventions():
    assert (torchvision_convention("resnet50").size, torchvision_convention("resnet50").resize) == (224, 256)
    assert (torchvision_convention("vgg16").size, torchvision_convention("vgg16").resize) == (224, 256)
    assert (torchvision_convention("inception_v3").size, torchvision_convention("inception_v3").resize) == (299, 342)
    v2 = torchvision_convention("resnet50", Path("resnet50-11ad3fa6.pth"))  # the file name of torchvision's V2 weights
    assert (v2.size, v2.resize) == (224, 232)


def test_input_size_alone_keeps_the_crop_ratio(assets):
    subject = load_subject(spec_of(assets, input_size=48, resize=None), progress=False)
    assert subject.images.transform.size == 48 and subject.images.transform.resize == 54  # 48 * 256 / 224


def test_weights_of_another_architecture(assets, tmp_path):
    other = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=6).state_dict(), other)
    with pytest.raises(ValueError, match=rf"--weights {other}: not a resnet18 state dict \(is it for another architecture"):
        load_subject(spec_of(assets, weights=other), progress=False)


def test_weights_of_another_class_count(assets, tmp_path):
    state = torch.load(assets.weights, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    ten = tmp_path / "ten.pth"
    torch.save(state, ten)
    with pytest.raises(ValueError, match=rf"--weights {ten}: resnet18 weights for 10 classes \(fc.weight \(10, 512\)\), "
                                         rf"but the labels file {assets.labels} has 6 classes"):
        load_subject(spec_of(assets, weights=ten), progress=False)


@pytest.mark.parametrize("changes, message", [
    ({"vectors": None}, "--vectors: a subject needs word vectors"),
    ({"images": None}, "--images: a subject needs labelled images"),
    ({"weights": None}, "--weights: --model resnet18 needs a local weights file"),
    ({"model": None}, "--model or --model-entry: a subject needs a model"),
    ({"model_entry": "pkg:f"}, "give one of them"),
    ({"model": "resnet5O"}, r"--model 'resnet5O': not a torchvision .*classification architecture .*resnet50"),
    ({"weights": Path("/nonexistent/w.pth")}, r"--weights /nonexistent/w.pth: no such file"),
])
def test_incomplete_or_wrong_specs(assets, changes, message):
    with pytest.raises(ValueError, match=message):
        load_subject(spec_of(assets, **changes), progress=False)


def test_unknown_architecture_without_timm(assets, monkeypatch):
    """Without the timm extra the message says torchvision only and how to get timm's architectures."""
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ValueError, match=r"--model 'resnet5O': not a torchvision classification architecture "
                                         r".*resnet50.*pip install 'semguard\[timm\]'"):
        load_subject(spec_of(assets, model="resnet5O"), progress=False)


def test_unknown_architecture_with_timm(assets):
    pytest.importorskip("timm", reason="the timm extra (pip install 'semguard[timm]') is not installed")
    with pytest.raises(ValueError, match=r"--model 'resnet5O': not a torchvision or timm .*resnet50"):
        load_subject(spec_of(assets, model="resnet5O"), progress=False)


def test_entry_point_model(assets, entry, tmp_path):
    subject = load_subject(spec_of(assets, model=None, weights=None, model_entry=f"{entry}:tiny"), progress=False)
    assert subject.name == f"{entry}:tiny" and isinstance(subject.model, Normalized)
    assert subject.model_spec.builder == "entry_point" and subject.layers == ["act", "relu"]
    weights = tmp_path / "tiny.pth"  # the entry point's own weights file loads into the module it returns
    state = {k: torch.full_like(v, 0.1) for k, v in subject.model.model.state_dict().items()}
    torch.save(state, weights)
    loaded = load_subject(spec_of(assets, model=None, weights=weights, model_entry=f"{entry}:tiny"), progress=False)
    assert torch.equal(loaded.model.model.fc.weight, state["fc.weight"])
    with pytest.raises(ValueError, match=rf"--model-entry {entry}:four: gives outputs \(1, 4\) per image, "
                                         rf"but the labels file {assets.labels} has 6 classes"):
        load_subject(spec_of(assets, model=None, weights=None, model_entry=f"{entry}:four"), progress=False)


def calibrate(subject, out: Path) -> Path:
    images = subject.images.load(np.arange(len(subject.images)))
    with torch.no_grad():
        labels = subject.model(images).argmax(1).numpy()  # random weights: the model's own answers are the truth
    words = subject.word_vectors.copy()
    words[~subject.matched] = np.random.default_rng(0).normal(size=(int((~subject.matched).sum()), words.shape[1]))
    calibrate_guard(subject.model, subject.model_spec, subject.layers[-3:], subject.classes, words, images, labels,
                    out, model_name=subject.name, source_weights=subject.source_weights,
                    config=CalibrationConfig(k=6, per_concept=1, target_fpr=0.2, batch_size=32))
    return out


def test_bundle_of_a_torchvision_subject_rebuilds_the_wrapped_model(subject, tmp_path):
    bundle = read_bundle(calibrate(subject, tmp_path / "bundle"))
    assert bundle.manifest.model_name == "resnet18" and bundle.manifest.input_shape == (3, INPUT_SIZE, INPUT_SIZE)
    assert isinstance(bundle.model, Normalized) and bundle.manifest.labels == tuple(subject.classes)
    images = subject.images.load(np.arange(3))
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(images), subject.model(images))


def test_bundle_of_an_entry_point_needs_trust(assets, entry, tmp_path):
    # the user's factory builds the architecture; the weights come from --weights
    subject = load_subject(spec_of(assets, model=None, model_entry=f"{entry}:resnet"), progress=False)
    out = calibrate(subject, tmp_path / "bundle")
    sys.modules.pop(entry)
    with pytest.raises(UntrustedModelCode, match=rf"entry point '{entry}:resnet'.*--trust-model-code"):
        read_bundle(out)
    assert entry not in sys.modules  # refused before anything was imported
    bundle = read_bundle(out, trust_model_code=True)
    images = subject.images.load(np.arange(3))
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(images), subject.model(images))


def test_timm_architecture(assets, tmp_path):
    timm = pytest.importorskip("timm", reason="the timm extra (pip install 'semguard[timm]') is not installed")
    weights = tmp_path / "timm-resnet10t.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=6).state_dict(), weights)
    subject = load_subject(spec_of(assets, model="timm/resnet10t", weights=weights), progress=False)
    assert subject.name == "timm/resnet10t" and subject.model_spec.builder == "timm_normalized"
    assert subject.images.transform.interpolation == "bicubic"  # timm's pretrained config, not torchvision's
    rebuilt = create_model(subject.model_spec)  # what a bundle does before loading model.safetensors
    rebuilt.load_state_dict(subject.model.state_dict())
    images = subject.images.load(np.arange(2))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), subject.model(images))
