import pytest
import torch
from torchvision.models.feature_extraction import get_graph_node_names

from semguard.detector.layers import LayerTap
from semguard.models.presets import preset_info, preset_layers
from semguard.models.worldnet import WorldNet, WorldNetConfig, load_world_model, save_worldnet, worldnet_layers


def test_forward_shape_and_input_range_convention():
    model = WorldNet(WorldNetConfig(num_classes=10)).eval()
    out = model(torch.rand(4, 3, 32, 32))
    assert out.shape == (4, 10) and out.dtype == torch.float32


def test_preset_names_are_graph_nodes_in_depth_order():
    model = WorldNet().eval()
    _, eval_nodes = get_graph_node_names(model)
    infos = preset_info("worldnet")
    assert [i.name for i in infos] == [i.name for i in worldnet_layers()]
    assert all(i.name in eval_nodes for i in infos)
    assert [i.depth for i in infos] == list(range(len(infos)))
    assert 10 <= len(infos) <= 20
    assert infos[-1].name == "flatten"


def test_tap_every_preset_layer():
    torch.manual_seed(0)
    model = WorldNet(WorldNetConfig(num_classes=7))
    tap = LayerTap(model, preset_layers("worldnet"))
    out = tap(torch.rand(3, 3, 32, 32))
    assert out.logits.shape == (3, 7)
    assert list(out.acts) == preset_layers("worldnet")
    assert out.acts["stem.2"].shape == (3, 16 * 16 * 16)
    assert out.acts["flatten"].shape == (3, 64)
    assert all((a >= 0).all() for a in out.acts.values())  # every tap is after a ReLU


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(1)
    model = WorldNet(WorldNetConfig(num_classes=5, widths=(8, 16, 32), blocks=(1, 1, 1))).eval()
    path = save_worldnet(model, tmp_path / "w.safetensors")
    loaded = load_world_model(path)
    assert loaded.config == model.config and not loaded.training
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_world_model(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a WorldNet"):
        load_world_model(tmp_path / "other.safetensors")


def test_saved_file_bytes_are_deterministic(tmp_path):
    torch.manual_seed(2)
    model = WorldNet(WorldNetConfig(num_classes=5, widths=(8, 16, 32), blocks=(1, 1, 1)))
    a = save_worldnet(model, tmp_path / "a.safetensors").read_bytes()
    b = save_worldnet(model, tmp_path / "b.safetensors").read_bytes()
    assert a == b
