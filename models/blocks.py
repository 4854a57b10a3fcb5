"""Taps at each block's output, for architectures made of blocks (issue 27): `--layers blocks`.

A block is a module that computes something of its own, made of other modules, and is not one of
torch.nn's layers or containers: its class derives from no torch.nn class but nn.Module itself and
it has child modules (ResNet's Bottleneck, EfficientNet's MBConvBlock, ConvNeXt's CNBlock, a ViT's
EncoderBlock, Inception's InceptionA; not a Conv2d subclass with "same" padding, not a Sequential of
conv, norm and activation). Blocks inside a block are not tapped again (the outermost ones only), except
inside a stage: a block that runs two or more blocks of one class from one Sequential or ModuleList (a
ViT's Encoder) is not itself tapped, its blocks are. A block the eval graph never runs (Inception's
auxiliary head) is left out. A block's tap is its output:
the last graph node under its name, the module query LayerTap resolves (torchvision's convention).
"""
from __future__ import annotations

from collections import Counter

from torch import nn

from semguard.models.graph import graph_node_names

BLOCKS = "blocks"  # the `--layers` value that asks for these taps


def _is_block(module: nn.Module) -> bool:
    own = [c for c in type(module).__mro__ if c.__module__.startswith("torch.nn") and c is not nn.Module]
    return not own and any(True for _ in module.children())


def _is_stage(module: nn.Module) -> bool:
    """Holds >= 2 blocks of one class in one container: a sequence of blocks, tapped one by one."""
    for container in module.modules():
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            blocks = Counter(type(m) for m in container.children() if _is_block(m))
            if blocks and max(blocks.values()) >= 2:
                return True
    return False


def block_modules(model: nn.Module) -> list[str]:
    """Qualified names of the model's outermost blocks that its eval graph runs, in registration order;
    ValueError when it has none (a model not made of blocks: tap its activations or name the layers)."""
    names = graph_node_names(model)
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(outer + ".") for outer in found) or not _is_block(module):
            continue
        if _is_stage(module):
            continue  # its blocks are tapped
        if any(n.startswith(name + ".") or n == name for n in names):
            found.append(name)
    if not found:
        raise ValueError(f"layers: {type(model).__name__} is not made of blocks (modules of its own class holding "
                         "other modules) that its graph runs; leave --layers out to tap every activation output, "
                         "or name the graph nodes with --layers a,b,c")
    return found
