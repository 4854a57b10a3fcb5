"""Images per tapped forward pass under a memory budget (`--memory-budget GIB`): the one rule that
`attack analyze` and `detector calibrate|evaluate` size their passes by."""
from __future__ import annotations

import torch

from semguard.detector.layers import LayerTap

TAP_BATCH = 128  # images per tapped forward pass, at most (fewer when --memory-budget says so)
# bytes held per tapped float32 activation in a pass: the tap's value, the forward's other intermediates
# around it and the float64 correlation temporaries (measured ~3x on EfficientNet-Lite0: 96 images, 8.5 GiB)
HELD_PER_ACTIVATION = 12


def tap_batch_size(tap: LayerTap, image: torch.Tensor, memory_budget_gib: float, at_most: int = TAP_BATCH) -> int:
    """Images per tapped pass so that one pass holds about `memory_budget_gib` (1 .. at_most);
    image: (1, 3, H, W), tapped once to measure the activations per image."""
    if memory_budget_gib <= 0:
        raise ValueError(f"--memory-budget must be > 0 GiB, got {memory_budget_gib}")
    with torch.no_grad():
        width = sum(a.shape[1] for a in tap(image.to(tap.device)).acts.values())  # floats per image, all layers
    return int(max(1, min(at_most, memory_budget_gib * 2**30 // (HELD_PER_ACTIVATION * width))))
