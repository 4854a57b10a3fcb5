"""detector.layers: LayerTap and iter_activations (on tiny models, torchvision presets and Normalized wrappers)."""
import weakref

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset

from semguard.detector.layers import LayerTap, TapOutput, iter_activations
from semguard.models.normalize import Normalized, imagenet_classifier
from semguard.models.presets import preset_layers




# --------------------------------------------------------------------------- taps


class Tiny(nn.Module):
    """Conv, in-place ReLU (which would overwrite a tapped conv output), functional ReLU, head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = torch.relu(self.bn(self.conv2(x)))
        return self.head(x.flatten(1))


def hooked(model, names, x):
    """Eager forward with hooks on modules: copies of their outputs (B, k)."""
    seen = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(n, o.detach().clone().flatten(1))
        )
        for n in names
    ]
    logits = model(x)
    for h in handles:
        h.remove()
    return logits, seen


def test_tap_matches_forward_hooks_on_tiny_model():
    torch.manual_seed(0)
    model = Tiny()
    model.bn.running_mean.normal_()  # eval-mode statistics differ from batch statistics
    x = torch.randn(3, 3, 8, 8)
    tap = LayerTap(model, ["conv1", "act", "bn", "relu", "head"])
    out = tap(x)
    assert isinstance(out, TapOutput) and tap.layers == ["conv1", "act", "bn", "relu", "head"]
    logits, seen = hooked(model.eval(), ["conv1", "act", "bn", "head"], x)
    torch.testing.assert_close(out.logits, logits)
    assert (out.acts["conv1"] < 0).any()  # the copy was taken before the in-place ReLU
    assert tap._copied == {"conv1"}  # only the value a later in-place op changes is copied
    for name in ["conv1", "act", "bn", "head"]:
        torch.testing.assert_close(out.acts[name], seen[name])
    torch.testing.assert_close(out.acts["relu"], seen["bn"].clamp_min(0))
    shapes = {k: tuple(v.shape) for k, v in out.acts.items()}
    assert shapes == {"conv1": (3, 256), "act": (3, 256), "bn": (3, 96), "relu": (3, 96), "head": (3, 5)}
    assert all(v.dtype == torch.float32 for v in out.acts.values())


def test_tap_copies_only_values_changed_in_place_and_works_in_inference_mode():
    torch.manual_seed(2)
    model = Tiny()
    x = torch.randn(2, 3, 8, 8)
    _, seen = hooked(model.eval(), ["conv1", "bn"], x)
    tap = LayerTap(model, ["bn", "act"])  # no tapped value is changed in place later
    out = tap(x)
    assert tap._copied == frozenset()
    torch.testing.assert_close(out.acts["bn"], seen["bn"])
    with torch.inference_mode():  # inference tensors have no version counter: copied, still right
        got = LayerTap(model, ["conv1"])(x)
    torch.testing.assert_close(got.acts["conv1"], seen["conv1"])
    assert (got.acts["conv1"] < 0).any()
    tap = LayerTap(model, ["conv1"])
    first, second = tap(x), tap(x)  # the second call runs the rebuilt graph directly
    assert tap._copied == {"conv1"}
    torch.testing.assert_close(first.acts["conv1"], seen["conv1"])
    torch.testing.assert_close(second.acts["conv1"], seen["conv1"])


def test_tap_keeps_eval_mode_and_supports_grad():
    torch.manual_seed(1)
    model = Tiny()
    tap = LayerTap(model, ["bn"])
    model.train()  # the tap reads eval-mode activations regardless
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = tap(x)
    (out.logits.sum() + out.acts["bn"].sum()).backward()
    x2 = x.detach().clone().requires_grad_(True)
    model.eval()
    y = model.bn(model.conv2(model.act(model.conv1(x2))))
    (model(x2).sum() + y.sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_tap_rejects_unknown_names_with_suggestions():
    model = Tiny()
    with pytest.raises(ValueError, match=r"'conv3'.*close node names: .*'conv1'"):
        LayerTap(model, ["conv3"])
    with pytest.raises(ValueError, match="unique"):
        LayerTap(model, ["conv1", "conv1"])
    with pytest.raises(ValueError, match="non-empty"):
        LayerTap(model, [])
    with pytest.raises(ValueError, match="images"):
        LayerTap(model, ["conv1"])(torch.zeros(0, 3, 8, 8))


def test_tap_does_not_keep_untapped_intermediates_alive():
    torch.manual_seed(2)
    model = nn.Sequential(*[nn.Linear(16, 16) if i % 2 == 0 else nn.Tanh() for i in range(8)])
    refs = {}
    alive_at_end = []
    for i in range(7):
        model[i].register_forward_hook(lambda m, inp, out, i=i: refs.__setitem__(i, weakref.ref(out)))
    model[7].register_forward_pre_hook(
        lambda m, inp: alive_at_end.append([i for i, r in refs.items() if r() is not None])
    )
    with torch.no_grad():  # with grad, autograd itself saves tensors for backward
        out = LayerTap(model, ["1", "3"])(torch.randn(4, 16))
    # Alive when the last layer runs: its input and the tapped values themselves (returned, not
    # copied: nothing changes them in place); no other intermediate.
    assert alive_at_end == [[1, 3, 6]]
    assert set(out.acts) == {"1", "3"}


def test_resnet50_preset_forward_matches_hooks():
    torch.manual_seed(3)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.rand(2, 3, 64, 64)
    out = LayerTap(model, preset_layers("resnet50"))(x)
    assert out.logits.shape == (2, 1000) and len(out.acts) == 49
    assert out.acts["relu"].shape == (2, 64 * 32 * 32)
    assert out.acts["layer4.2.relu_2"].shape == (2, 2048 * 2 * 2)
    # A bottleneck calls its one ReLU module three times: relu, relu_1, relu_2.
    calls = []
    hook = model.layer3[4].relu.register_forward_hook(lambda m, i, o: calls.append(o.detach().clone().flatten(1)))
    torch.testing.assert_close(model(x), out.logits)
    hook.remove()
    for suffix, expected in zip(["", "_1", "_2"], calls):
        torch.testing.assert_close(out.acts[f"layer3.4.relu{suffix}"], expected)


def test_inception_v3_preset_taps_a_normalized_model():
    torch.manual_seed(4)
    model = imagenet_classifier("inception_v3")
    tap = LayerTap(model, preset_layers("inception_v3"))  # preset names resolve under "model."
    assert tap.nodes[0] == "model.Conv2d_1a_3x3.relu"
    out = tap(torch.rand(1, 3, 75, 75))  # Inception-v3's smallest input
    assert out.logits.shape == (1, 1000) and len(out.acts) == 105
    assert out.acts["Mixed_7c.cat_2"].shape == (1, 2048)


# --------------------------------------------------------------------------- Normalized


def test_normalized_normalises_then_calls_the_model():
    torch.manual_seed(5)
    inner = Tiny().eval()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    model = Normalized(inner, mean, std)
    x = torch.rand(2, 3, 8, 8)
    expected = inner((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(model(x), expected)
    bare, full = LayerTap(model, ["conv1"])(x), LayerTap(model, ["model.conv1"])(x)
    torch.testing.assert_close(bare.acts["conv1"], full.acts["model.conv1"])
    with pytest.raises(ValueError, match="mean, std"):
        Normalized(inner, (0.1, 0.2), std)
    with pytest.raises(ValueError, match="std"):
        Normalized(inner, mean, (0.5, 0.0, 1.0))




# --------------------------------------------------------------------------- iter_activations


class Pairs(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 3


def test_iter_activations_chunks_equal_one_pass():
    torch.manual_seed(6)
    tap = LayerTap(Tiny(), ["conv1", "relu"])
    images = torch.randn(7, 3, 8, 8)
    full = tap(images)
    for source in (images, Pairs(images)):
        grad_inside = []
        chunks = []
        for where, out in iter_activations(tap, source, batch_size=3):
            grad_inside.append(torch.is_grad_enabled())  # no_grad must not leak into the caller
            assert not out.logits.requires_grad
            chunks.append((where, out))
        assert [(w.start, w.stop) for w, _ in chunks] == [(0, 3), (3, 6), (6, 7)]
        assert all(grad_inside)
        torch.testing.assert_close(torch.cat([o.logits for _, o in chunks]), full.logits.detach())
        for name in tap.layers:
            torch.testing.assert_close(torch.cat([o.acts[name] for _, o in chunks]), full.acts[name].detach())


def test_iter_activations_rejects_bad_input():
    tap = LayerTap(Tiny(), ["conv1"])
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_activations(tap, torch.zeros(2, 3, 8, 8), 0))
    with pytest.raises(ValueError, match="images_or_dataset"):
        next(iter_activations(tap, [torch.zeros(3, 8, 8)], 2))




class _Residual(nn.Module):
    """conv -> bn, `out += x`, relu: the residual pattern tracing turns into an out-of-place add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        return self.relu(out).mean((2, 3))


@pytest.mark.parametrize("layers,in_place", [(["relu"], 1), (["bn", "relu"], 0)])
def test_residual_adds_run_in_place_unless_the_left_operand_is_tapped(layers, in_place):
    import operator

    torch.manual_seed(0)
    model = _Residual().eval()
    model.bn.running_mean.uniform_(-1, 1)  # a batch norm that changes its input
    tap = LayerTap(model, layers)
    assert sum(n.target is operator.iadd for n in tap.module.graph.nodes) == in_place
    x = torch.rand(4, 3, 5, 5)
    with torch.no_grad():
        out = tap(x)
        torch.testing.assert_close(out.logits, model(x), rtol=0, atol=0)
        bn = model.bn(model.conv(x))
        torch.testing.assert_close(out.acts["relu"], torch.relu(bn + x).flatten(1), rtol=0, atol=0)
        if "bn" in layers:
            torch.testing.assert_close(out.acts["bn"], bn.flatten(1), rtol=0, atol=0)


