"""The subject header: what every report.md and batch command's console summary starts with.

    header = subject_header(subject, labels, predicted)     # JSON-able, stored in analysis.json / study.json
    print("\\n".join(render_subject_header(header)))

It states the model, the preprocessing actually used (input size, resize, normalisation), the classes
matched with a word vector, the images read and skipped, and the model's top-1 accuracy on the images
the command analysed, so that a study run on wrongly preprocessed images says so on its first lines.
"""
from __future__ import annotations

import numpy as np

# Below this top-1 accuracy the header warns that the preprocessing may be wrong. The paper's models
# reach 0.72-0.77 on ImageNet (VGG-16 0.716, ResNet-50 0.761, Inception-v3 0.773: torchvision's
# figures) and small CIFAR-10 nets 0.8-0.9; a wrong resize, crop or normalisation typically costs tens
# of points (issue 25: a 32-pixel CIFAR net fed 37-pixel zooms, 11 of 20 right). 0.6 flags that and
# leaves every paper model's correct setting clear of it.
ACCURACY_WARNING = 0.6


def subject_header(subject, labels: np.ndarray | None = None, predicted: np.ndarray | None = None,
                   measured: tuple[float, int] | None = None) -> dict:
    """The header record of `subject` (a semguard.subject.Subject); accuracy over `labels` vs
    `predicted` ((n,) class ids of the images analysed), or `measured` = (accuracy, images) when the
    command has it already; None when the command predicted nothing."""
    how = subject.preprocessing
    record = {
        "model": subject.name,
        "weights": subject.source_weights,
        "preprocessing": how._asdict() if how is not None else None,
        "classes": len(subject.classes),
        "classes_matched": int(np.sum(subject.matched)),
        "images_read": len(subject.images),
        "images_skipped": len(subject.images.skipped),
        "accuracy": None,
        "images_analysed": None,
    }
    if labels is not None and predicted is not None and len(labels):
        measured = (float(np.mean(np.asarray(labels) == np.asarray(predicted))), len(labels))
    if measured is not None:
        record["accuracy"], record["images_analysed"] = float(measured[0]), int(measured[1])
    return record


def accuracy_warning(header: dict) -> str | None:
    """The warning line when the accuracy is below ACCURACY_WARNING, else None."""
    acc = header.get("accuracy")
    if acc is None or acc >= ACCURACY_WARNING:
        return None
    return (f"WARNING: top-1 accuracy {acc:.3f} is below {ACCURACY_WARNING}: check the preprocessing "
            "(input_size, resize, mean, std) before reading the results")


def render_subject_header(header: dict) -> list[str]:
    """The header's lines (plain text; a report puts them under its title)."""
    how = header.get("preprocessing")
    weights = f" (weights {header['weights']})" if header.get("weights") else ""
    acc = header.get("accuracy")
    accuracy = ("not measured by this command" if acc is None else
                f"{acc:.3f} on the {header['images_analysed']} images analysed")
    lines = [f"subject: {header['model']}{weights}",
             f"  preprocessing  {_preprocessing(how)}",
             f"  classes        {header['classes_matched']} of {header['classes']} have a word vector",
             f"  images         {header['images_read']} read, {header['images_skipped']} skipped (unreadable)",
             f"  top-1 accuracy {accuracy}"]
    warning = accuracy_warning(header)
    return lines + ([f"  {warning}"] if warning else [])


def _preprocessing(how: dict | None) -> str:
    if how is None:
        return "not recorded"
    size = f"{how['input_size']} x {how['input_size']}"
    if how["resize"] is None:
        shape = f"{size}, images as stored"
    elif how["resize"] == how["input_size"]:
        shape = f"{size}: short side to {how['resize']} ({how['interpolation']}), centre crop"
    else:
        shape = f"{size} centre crop of the short side resized to {how['resize']} ({how['interpolation']})"
    norm = ("no normalisation by semguard (the model's own)" if how["mean"] is None else
            f"normalised with mean {_floats(how['mean'])}, std {_floats(how['std'])}")
    return f"{shape}; {norm}; size from {how['decided_by']}"


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
