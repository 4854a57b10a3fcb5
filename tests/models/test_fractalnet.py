"""FractalNet against its definition (Larsson et al. 2016): columns, depth, joins, drop-path, size."""
import pytest
import torch
from semguard.models.factory import ModelSpec, create_model
from semguard.detector.layers import LayerTap
from semguard.models.presets import preset_info
from semguard.models.fractalnet import FractalNet, FractalNetConfig, fractalnet_layers
from torch import nn

PAPER_PARAMS_20_LAYERS = 38.6e6  # FractalNet paper, Table 1: 20 layers (C=3, B=5), CIFAR-100


def units(column: nn.ModuleList) -> int:
    return len(column)


@pytest.mark.parametrize("columns", [1, 2, 3, 4])
def test_block_has_c_columns_of_depth_2_to_the_c(columns):
    model = FractalNet(FractalNetConfig(num_classes=5, widths=(4, 8), columns=columns, dropout=(0.0, 0.0)))
    for block in model.blocks:
        assert len(block.columns) == columns
        assert [units(c) for c in block.columns] == [2 ** c for c in range(columns)]  # deepest: 2^(C-1)
    relus = [i for i in fractalnet_layers(model.config) if i.name.endswith("relu")]
    assert len(relus) == 2 * (2 ** columns - 1)  # every conv unit of every column, once


def test_recursive_definition_two_columns():
    # f_2(z) = join(f_1(f_1(z)), f_1(z)) with join = mean; in eval mode.
    torch.manual_seed(0)
    model = FractalNet(FractalNetConfig(num_classes=3, widths=(4,), columns=2, dropout=(0.0,))).eval()
    block, z = model.blocks[0], torch.rand(2, 3, 8, 8)
    want = (block.columns[1][1](block.columns[1][0](z)) + block.columns[0][0](z)) / 2
    torch.testing.assert_close(block(z, ("all",)), want)


def paper_conv_weights(widths: tuple[int, ...], columns: int, c_in: int = 3) -> int:
    """3x3 conv weights of B fractal blocks by the paper's definition: a block has 2^C - 1 convs, the first
    unit of each of its C columns reads the block input (c_in channels), the other 2^C - 1 - C read w."""
    total = 0
    for w in widths:
        total += 9 * w * (columns * c_in + (2 ** columns - 1 - columns) * w)
        c_in = w
    return total


def test_cifar_configuration_parameter_count():
    config = FractalNetConfig()  # widths 64-128-256-512-512, B=5, C=3: the paper's 20-layer CIFAR-100 net
    with torch.device("meta"):  # shapes only: no 34M (and 76M) weights to initialise
        model, model_c4 = FractalNet(config), FractalNet(FractalNetConfig(columns=4))
    convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    total = sum(p.numel() for p in model.parameters())
    # The authors' Caffe generator (gustavla/fractalnet, generation/fractalnet.py: FILTERS 64..512,
    # COLUMNS 3, REDUCTIONS 5) builds exactly these conv shapes, plus a bias per conv channel.
    authors = convs + sum(m.weight.shape[0] for m in model.modules() if isinstance(m, nn.Conv2d)) + 512 * 100 + 100
    c4 = sum(p.numel() for p in model_c4.parameters())
    print(f"\nFractalNet CIFAR-100, widths 64-128-256-512-512, B=5, C=3 (20 layers): ours {total / 1e6:.2f}M "
          f"parameters ({convs / 1e6:.2f}M conv weights = the paper's definition; the authors' generator "
          f"{authors / 1e6:.2f}M); paper, Table 1: {PAPER_PARAMS_20_LAYERS / 1e6:.1f}M. C=4 (40 layers): {c4 / 1e6:.1f}M")
    assert convs == paper_conv_weights(config.widths, config.columns)
    assert config.columns == 3 and 33.5e6 < total < 34e6  # 4.8M short of Table 1's 38.6M (see BENCHMARKS.md)


def test_drop_path_only_in_training_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = FractalNet(FractalNetConfig(num_classes=4, widths=(4, 8), columns=3, dropout=(0.0, 0.0)))
    x = torch.rand(3, 3, 16, 16)
    model.eval()
    assert model.drop_path_plan() == ("all",)
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    plans = {model.drop_path_plan()[0] for _ in range(50)}
    assert plans == {"global", "local"}


def test_global_drop_path_keeps_one_column():
    torch.manual_seed(0)
    model = FractalNet(FractalNetConfig(num_classes=3, widths=(4,), columns=2, dropout=(0.0,))).eval()
    block, z = model.blocks[0], torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(block(z, ("global", 0)), block.columns[0][0](z))
    torch.testing.assert_close(block(z, ("global", 1)), block.columns[1][1](block.columns[1][0](z)))


def test_preset_taps_every_relu_and_block_output_and_builder():
    infos = preset_info("fractalnet")
    assert len(infos) == 5 * (7 + 1) and [i.block for i in infos if i.name.endswith(".out")] == [f"block{b}" for b in range(1, 6)]
    config = FractalNetConfig(num_classes=4, widths=(4, 8), columns=2, dropout=(0.0, 0.0))
    model = create_model(ModelSpec("fractalnet", {"num_classes": 4, "widths": [4, 8], "columns": 2, "dropout": [0, 0]},
                                  "semguard.models.fractalnet"))
    layers = [i.name for i in fractalnet_layers(config)]
    out = LayerTap(model, layers)(torch.rand(2, 3, 8, 8))
    assert list(out.acts) == layers and out.logits.shape == (2, 4)
