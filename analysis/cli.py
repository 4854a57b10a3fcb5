"""`semguard quickstart` command line."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from semguard.config_flags import Flag, add_config_flags, add_world_cache_flag, config_from_flags, defer_arguments

# Types and defaults come from QuickstartConfig (imported on first use: it imports the whole method).
QUICKSTART_FLAGS: tuple[Flag, ...] = (
    Flag("--classes", "world.n_classes", "number of concepts"),
    Flag("--permutations", "n_permutations", "permutations per layer (paper: 1000)"),
    Flag("--image-sets", "image_sets", "image sets per concept (paper: 5)"),
    Flag("--seed", "seed"),
    Flag("--torch-threads", "torch_threads", "torch intra-op threads (the world's tensors are small)"),
    Flag("--quiet", "progress", "no progress bars"),
)

if TYPE_CHECKING:
    from semguard.analysis.quickstart import QuickstartConfig


def add_quickstart_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="run the paper's method end to end on the embedded world (offline)",
        description="Builds (or reuses) the embedded world, its word vectors and CNN; runs 2 vs 2 through the "
        "layers, a targeted MI-FGSM attack set and the 1 vs 2 analyses of adversarial and misclassified images, "
        "each with permutation tests and BHY; writes summary.json, figures and report.md.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_world_cache_flag(p, "where built worlds (images, vectors, CNN, attack sets) are kept and reused")
    defer_arguments(p, _add_quickstart_flags)
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="extract the 2 vs 2 activations on Ray actors (needs semguard[ray]); ADDRESS: auto, "
                        "ray://HOST:10001, or none to start Ray on this machine")
    p.set_defaults(func=run)


def _add_quickstart_flags(p: argparse.ArgumentParser) -> None:
    from semguard.analysis.quickstart import QuickstartConfig

    add_config_flags(p, QuickstartConfig, QUICKSTART_FLAGS)


def quickstart_config(args: argparse.Namespace) -> QuickstartConfig:
    """QuickstartConfig for --out and --world-cache, with the flags given."""
    from semguard.analysis.quickstart import QuickstartConfig

    base = QuickstartConfig(out=args.out, cache_dir=args.world_cache, ray=getattr(args, "ray", None))
    return config_from_flags(args, base, QUICKSTART_FLAGS)


def run(args: argparse.Namespace) -> int:
    from semguard.analysis.quickstart import run_quickstart

    from semguard.analysis.report import render_summary

    summary = run_quickstart(quickstart_config(args))
    print(render_summary(summary, Path(args.out)))
    return 0


def add_attack_analyze_command(attack_commands: argparse._SubParsersAction) -> None:
    """`semguard attack analyze`: the paper's 1 vs 2 analyses of an attack set and of natural mistakes."""
    p = attack_commands.add_parser(
        "analyze",
        help="1 vs 2 by layer for an attack set (by target rank) and for misclassified test images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--attack-set", type=Path, required=True, help="directory written by `semguard attack generate`")
    p.add_argument("--out", type=Path, required=True, help="where analysis.json and the figures go")
    add_world_cache_flag(p, "the embedded world's cache (for sets that record no subject)")
    from semguard.subject.flags import add_subject_flags

    add_subject_flags(p)  # default: the subject the set records
    p.add_argument("--permutations", type=int, default=1000, help="permutations per layer (paper: 1000)")
    p.add_argument("--reference-size", type=int, default=100, help="reference concepts (paper: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="a subject's set: read at most N test images for the misclassified study and the references "
                        "(stratified over the classes with a word vector; default: all)")
    p.set_defaults(func=run_attack_analyze)


def attack_set_subject(args: argparse.Namespace, header: dict):
    """The subject to analyse a set on: the subject flags when they name assets, else what the set
    records (`attack generate` writes it; a --world-cache given explicitly still replaces a recorded
    world's cache), else the embedded world in --world-cache (sets older than the record)."""
    import dataclasses

    from semguard.attacks.cli import subject_spec_from_record
    from semguard.subject.flags import subject_spec_from_args
    from semguard.world_cache import DEFAULT_WORLD_CACHE

    spec = subject_spec_from_args(args, world_cache=args.world_cache)
    if spec.is_world() and header.get("subject") is not None:
        recorded = subject_spec_from_record(header["subject"])
        moved = recorded.is_world() and Path(args.world_cache) != Path(DEFAULT_WORLD_CACHE)
        spec = dataclasses.replace(recorded, world_cache=Path(args.world_cache)) if moved else recorded
    return spec


def run_attack_analyze(args: argparse.Namespace) -> int:
    from semguard.analysis.quickstart import analyze_attacks
    from semguard.attacks.generate import model_fingerprint
    from semguard.attacks.store import load_attack_set
    from semguard.world.inputs import load_world_inputs

    try:
        if args.max_images is not None and args.max_images < 1:
            raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
        attack_set = load_attack_set(args.attack_set)
        spec = attack_set_subject(args, attack_set.header)
        if spec.is_world():
            from semguard.world import WorldSettings

            inputs = load_world_inputs(settings=WorldSettings(seed=spec.world_seed), cache_dir=spec.world_cache)
            model, where = inputs.model, f"the world in {spec.world_cache}"
        else:
            from semguard.subject.core import load_subject

            subject = load_subject(spec)
            model, where = subject.model, f"the subject's model ({subject.name})"
        if attack_set.header["model_sha256"] != model_fingerprint(model):
            raise ValueError(f"{args.attack_set} was generated against another model than {where}")
        if spec.is_world():
            if args.max_images is not None:
                raise ValueError("--max-images: for a subject's set (the embedded world's test split is read whole)")
            result = analyze_attacks(inputs, attack_set, args.out, args.reference_size, args.permutations, args.seed)
        else:
            result = analyze_subject_attacks(subject, attack_set, args.out, args.reference_size, args.permutations,
                                             args.seed, max_images=args.max_images)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"semguard attack analyze: {err}") from None
    adv = result["adversarial_one_vs_two"]
    print(json.dumps({
        "attacks": result["attacks"],
        "layers": adv["layers"],
        "one_vs_two_mean_over_ranks": [round(a, 3) for a in adv["accuracy"]],
        "misclassified_count": result["misclassified"]["count"],
        "misclassified_mean_cosine": round(result["misclassified"]["mean_cosine"], 3),
    }, indent=2))
    print(f"figures and analysis.json in {args.out}")
    return 0


def _predict_indices(model, images, indices, batch_size: int = 64):
    """Predicted class (n,) of images.load(indices), batch by batch (a real test set is not held in memory)."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = [model(images.load(indices[i:i + batch_size]).to(device)).argmax(1).cpu().numpy()
               for i in range(0, len(indices), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def layer_blocks(name: str, layers: list[str]) -> list[str]:
    """Block of each tapped layer: the preset's when the subject's layers are a preset's, else the
    layer name up to its first dot ("layer3.1.relu" -> "layer3")."""
    from semguard.detector.layers import known_presets, preset_info

    if name in known_presets():
        info = {i.name: i.block for i in preset_info(name)}
        if all(n in info for n in layers):
            return [info[n] for n in layers]
    return [n.split(".")[0] for n in layers]


def analyze_subject_attacks(subject, attack_set, out: Path, reference_size: int = 100, n_permutations: int = 1000,
                            seed: int = 0, batch_size: int = 64, max_images: int | None = None) -> dict:
    """analysis.quickstart.analyze_attacks for any subject: 1 vs 2 of the set's successful images (by target
    rank) and of the misclassified test images, among the classes with a word vector only (the paper's 838
    of 1000). Test images are read in batches; only (n, R) profiles are kept. Figures and analysis.json in out.
    max_images: read at most this many test images (analysis.detector_eval.clean_image_indices: stratified)."""
    import numpy as np

    from semguard.analysis.detector_eval import clean_image_indices

    from semguard.analysis.adversarial import References, tapped
    from semguard.analysis.one_vs_two import choose_reference_set, mean_cosine, one_vs_two_by_layer, reference_profiles
    from semguard.analysis.quickstart import attack_summary, plot_attack_figures
    from semguard.detector.layers import LayerTap
    from semguard.files import write_json_atomic

    Path(out).mkdir(parents=True, exist_ok=True)
    matched = np.flatnonzero(subject.matched)  # analysis index -> class id
    remap = np.full(len(subject.classes), -1)
    remap[matched] = np.arange(len(matched))  # class id -> analysis index, -1 without a word vector
    vectors = np.asarray(subject.word_vectors, np.float64)[matched]
    tap = LayerTap(subject.model.eval(), subject.layers)
    images, labels = subject.images, np.asarray(subject.images.labels)
    # test images of classes with a word vector (all of them unless max_images says otherwise)
    pool = clean_image_indices(labels, np.asarray(subject.matched), max_images or len(labels), seed)
    true = remap[labels[pool]]
    predicted = remap[_predict_indices(subject.model, images, pool, batch_size)]  # -1: a class without a vector

    reference = choose_reference_set(true, predicted, len(matched), reference_size, seed)
    ref_batches = list(tapped(tap, images.load(pool[reference.image_index]), batch_size))
    references = References(reference, {n: np.concatenate([b[n] for b in ref_batches]) for n in tap.layers})

    def scores(batches, t, p, groups):
        profiles = reference_profiles(batches, references.acts)
        return one_vs_two_by_layer(profiles, t, p, reference, vectors, groups, n_permutations, seed)

    kept = attack_set.successful().records
    if not kept:
        raise ValueError(f"attack set {attack_set.path} has no successful attack to analyse")
    adv_true = remap[[r.source_class for r in kept]]
    adv_pred = remap[[r.target_class for r in kept]]
    if (adv_true < 0).any() or (adv_pred < 0).any():
        raise ValueError(f"attack set {attack_set.path} attacks classes without a word vector in this subject")
    adversarial = scores(tapped(tap, attack_set.images(kept), batch_size), adv_true, adv_pred,
                         np.array([r.rank for r in kept]))

    wrong = np.flatnonzero((predicted != true) & (predicted >= 0))  # mistaken for another class with a vector
    if len(wrong) == 0:
        raise ValueError("the model misclassifies no test image of a class with a word vector: nothing to analyse")
    chunks = (images.load(pool[wrong[i:i + batch_size]]) for i in range(0, len(wrong), batch_size))
    misclassified = scores((b for x in chunks for b in tapped(tap, x, batch_size)), true[wrong], predicted[wrong], None)

    result = attack_summary(attack_set, adversarial)
    result["misclassified"] = {**misclassified.as_json(),
                               "mean_cosine": mean_cosine(vectors, true[wrong], predicted[wrong])}
    result["subject"] = {"name": subject.name, "classes": len(subject.classes), "with_word_vector": len(matched),
                         "test_images": len(pool)}
    plot_attack_figures(out, adversarial, misclassified, layer_blocks(subject.name, subject.layers))
    write_json_atomic(out / "analysis.json", result)
    return result
