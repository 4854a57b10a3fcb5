"""attack analyze streams under --memory-budget: images per tapped pass follow from it (issue 27)."""
import pytest


def test_tap_batch_size_follows_the_memory_budget():
    import torch
    from torch import nn

    from semguard.analysis.attack_analysis import TAP_BATCH, tap_batch_size
    from semguard.detector.layers import LayerTap

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    tap = LayerTap(model, ["1"])  # 144 floats per image
    image = torch.rand(1, 3, 8, 8)
    assert tap_batch_size(tap, image, 1.0) == TAP_BATCH
    assert tap_batch_size(tap, image, 10 * 12 * 144 / 2**30) == 10
    assert tap_batch_size(tap, image, 1e-9) == 1
    with pytest.raises(ValueError, match="--memory-budget must be > 0 GiB"):
        tap_batch_size(tap, image, 0)
