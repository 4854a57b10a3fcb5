"""Adaptive evaluation: every detector against attackers who know it (`semguard detector evaluate --adaptive`).

Three threat models, each a row of every table (issue "adaptive attacks"; Carlini & Wagner, AISec 2017;
Tramer et al., NeurIPS 2020; Bryniarski et al., ICLR 2022):

  naive      targeted PGD on the classifier alone (the project's `pgd`, step eps/4): the attacker
             ignores the detector, as every other table of the project assumes.
  white_box  the attacker holds the detector: guard-aware PGD (`attacks.guard_pgd`) on its
             differentiable surrogate (`attacks.adaptive`: the guard's exact forward with BPDA for
             the 1 vs 2 fraction; ART's detector network in one torch graph), each configured mode
             (combined loss with a per-image lambda search; orthogonal PGD), per image the run the
             attacker's own reading of the exact detector likes best.
  gray_box   the attacker knows the method, classifier and code, not the detector's secret parts
             (reference prototypes, Gaussians, flagger weights, threshold, seed): it calibrates
             detectors of its own with `attacker_seed` on clean evaluation-part images that are not
             attacked (disjoint from the real calibration images) and its own training attacks,
             attacks those, and the real detectors score the result. `attacker_detectors` is given
             only what the attacker holds, never a path of the real bundle (tested with the bundle
             made unreadable and an audit hook on every file the process opens).

The attacked images are correctly classified evaluation-part images (never calibration images), one
seeded random other class as target each; the same images and targets in every cell. Per cell, always
decided by the exact detector at its calibrated threshold, never by a surrogate: attack success (the
model predicts the target), evasion (success and not flagged; share of all attacked images), TPR at 5%
FPR of the successful images against the clean evaluation images, mean L-inf and L2 of the
perturbation, the attack's run time, and the detector gradient's norm at the first and last step.
"""
from __future__ import annotations

import dataclasses
import tempfile
from fractions import Fraction
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from semguard.evaluation.detector_eval import (
    VARIANTS, AttackSpec, CleanSplit, Detector, DetectorEvalConfig, build_detectors, load_images, run_attack, take,
    training_attacks,
)
from semguard.attacks.adaptive import ActivationDetectorSurrogate, GuardSurrogate
from semguard.attacks.guard_pgd import MODES, GuardAttackConfig, GuardAttackResult, guard_pgd
from semguard.models.factory import ModelSpec
from semguard.detector.evaluate import detection_metrics
from semguard.files import write_json_atomic
from semguard.models.inputs import predict

THREAT_MODELS = ("naive", "white_box", "gray_box")
ATTACKABLE = ("detector", "mahalanobis", "signature_only", "art_binary_activation")


@dataclass(frozen=True)
class AdaptiveConfig:
    eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255, 0.15)  # L-inf; the paper's 0.15 last
    threat_models: tuple[str, ...] = THREAT_MODELS
    # the shipped guard, Lee et al.'s Mahalanobis baseline, the signature alone, ART's detector
    detectors: tuple[str, ...] = ATTACKABLE
    n_images: int = 100  # attacked images (correctly classified evaluation-part images)
    iterations: int = 100  # PGD steps of every attack (step eps/4); evasion stopped growing by ~100 (BENCHMARKS.md)
    modes: tuple[str, ...] = ("combined", "orthogonal")  # guard-aware attacks tried per image, best one kept
    restarts: int = 1
    attacker_seed: int = 1  # gray-box: the seed of the attacker's own detectors (the real ones use `seed`)
    attacker_sources: int | None = None  # gray-box: images per training attack of the attacker; None: as the real ones
    seed: int = 0  # attacked images and targets

    def __post_init__(self) -> None:
        bad = [t for t in self.threat_models if t not in THREAT_MODELS]
        if bad or not self.threat_models:
            raise ValueError(f"threat_models must be among {THREAT_MODELS}, got {list(self.threat_models)}")
        bad = [d for d in self.detectors if d not in ATTACKABLE]
        if bad or not self.detectors:
            raise ValueError(f"detectors must be among {ATTACKABLE}, got {list(self.detectors)}")
        if not self.eps or min(self.eps) <= 0 or self.n_images < 1 or self.iterations < 1 or self.restarts < 1:
            raise ValueError("eps must be values > 0; n_images, iterations and restarts >= 1")
        if not self.modes or any(m == "naive" or m not in MODES for m in self.modes):
            raise ValueError(f"modes must be among {MODES[1:]}, got {list(self.modes)}")


# What the quickstart runs: the shipped guard, 8/255, few images and steps, one mode (about a minute here).
QUICKSTART_ADAPTIVE = AdaptiveConfig(eps=(8 / 255,), detectors=("detector",), n_images=20, iterations=30,
                                     modes=("combined",), attacker_sources=100)


class AttackerView(NamedTuple):
    """What every attacker holds: the classifier and how the method is configured (public), no detector."""

    model: nn.Module
    model_spec: ModelSpec
    layers: list[str]
    label_names: list[str]
    word_vectors: np.ndarray
    model_name: str | None


class AdaptiveEvaluation(NamedTuple):
    results: dict  # threat model -> eps label -> detector -> cell (summary.json `detector.adaptive`)
    settings: dict
    seconds: float


def eps_label(eps: float) -> str:
    """8/255 -> "8/255", 0.15 -> "0.15"."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


def attack_plan(labels: np.ndarray, predicted: np.ndarray, pool: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(sources (m,), targets (m,)): m = min(n, correct pool images) seeded sources, a uniform other class each."""
    correct = pool[predicted[pool] == labels[pool]]
    rng = np.random.default_rng(seed)
    sources = np.sort(rng.choice(correct, min(n, len(correct)), replace=False))
    c = int(max(labels.max(), predicted.max())) + 1
    return sources, (labels[sources] + rng.integers(1, c, len(sources))) % c


def surrogate_of(model: nn.Module, d: Detector):
    """The differentiable stand-in of a detector from `detector_eval` (its `attack_view`)."""
    if isinstance(d.attack_view, tuple):  # ART: (layer, head, exact score)
        layer, head, detect = d.attack_view
        return ActivationDetectorSurrogate(model, layer, head, detect, d.threshold)
    return GuardSurrogate(d.attack_view)


def attacker_detectors(view: AttackerView, x: torch.Tensor | Dataset, y: np.ndarray, predicted: np.ndarray, pool: np.ndarray,
                       names: tuple[str, ...], cfg: DetectorEvalConfig, seed: int, sources: int | None,
                       out_dir: Path) -> dict[str, Detector]:
    """The gray-box attacker's own detectors `names`: the evaluation's recipe with `seed`, calibrated and
    trained (its own MI-FGSM images) on `pool` images only. Reads nothing of the real detectors."""
    train = cfg.train_attacks if sources is None else tuple(
        dataclasses.replace(a, n_sources=min(a.n_sources, sources)) for a in cfg.train_attacks)
    own = dataclasses.replace(cfg, seed=seed, detector=dataclasses.replace(cfg.detector, seed=seed), train_attacks=train,
                              variants=tuple(n for n in names if n in VARIANTS), adaptive=None, progress=False,
                              art_layer=cfg.art_layer if "art_binary_activation" in names else None)
    train_adv, _ = training_attacks(view.model, x, y, predicted, pool, view.word_vectors, own)
    dets, _ = build_detectors(view.model, view.model_spec, view.layers, view.label_names, view.word_vectors,
                              (take(x, pool), y[pool]), train_adv, out_dir, out_dir, own, view.model_name)
    return {d.name: d for d in dets if d.name in names}


def strongest(surrogate, images: torch.Tensor, targets: torch.Tensor, eps: float, acfg: AdaptiveConfig) -> tuple[torch.Tensor, list[GuardAttackResult]]:
    """Each mode's guard_pgd; per image the run the attacker's detector (`surrogate.verdict`) likes best:
    evading first, then at the target with the lowest score."""
    runs = [guard_pgd(surrogate, images, targets, GuardAttackConfig(mode=m, eps=eps, iterations=acfg.iterations,
                                                                    restarts=acfg.restarts, seed=acfg.seed))
            for m in acfg.modes]
    keys = np.stack([np.where(r.evaded, r.score - 1e9, np.where(r.reached, r.score, np.inf)) for r in runs])
    best = keys.argmin(0)
    adv = torch.stack([runs[b].adversarial[i] for i, b in enumerate(best)]) if len(best) else images
    return adv, runs


def gradient_stats(runs: list[GuardAttackResult]) -> dict:
    """Median L2 norm of d(detector loss)/dx over images not yet evading, at the first and the last step of the
    first run of each mode, and the share of exactly zero gradients over every not-yet-evading iterate."""
    first, last, every = [], [], []
    for r in runs:
        t = r.traces[0]
        first.append(t.grad_norm[0][~t.evading_now[0]])
        last.append(t.grad_norm[-1][~t.evading_now[-1]])
        every += [tr.grad_norm[~tr.evading_now] for tr in r.traces]
    med = lambda a: float(np.median(a)) if a.size else float("nan")  # noqa: E731
    every_ = np.concatenate(every)
    return {"median_start": med(np.concatenate(first)), "median_end": med(np.concatenate(last)),
            "zero_share": float((every_ == 0).mean()) if every_.size else float("nan")}


def wilson_interval(k: int, n: int) -> list[float]:
    """Wilson score 95% interval [low, high] of a proportion k / n."""
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def cell(d: Detector, clean_scores: np.ndarray, model: nn.Module, x_clean: torch.Tensor, adv: torch.Tensor,
         targets: np.ndarray, seconds: float) -> dict:
    """One table cell, decided by the exact detector `d` at its calibrated threshold."""
    reached = predict(model, adv, 256) == targets
    scores = d.score(adv)
    evaded = reached & ~(scores > d.threshold)
    m = detection_metrics(clean_scores, scores[reached], d.threshold) if reached.any() else None
    delta = (adv - x_clean).flatten(1)
    nan = float("nan")
    return {"n": len(targets), "attack_success": float(reached.mean()), "evasion": float(evaded.mean()),
            "evasion_ci95": wilson_interval(int(evaded.sum()), len(targets)),
            "evasion_of_successful": float(evaded[reached].mean()) if reached.any() else nan,
            "tpr_at_5fpr": m.tpr_at_fpr if m else nan, "auroc": m.auroc if m else nan,
            "mean_linf": float(delta.abs().max(1).values.mean()), "mean_l2": float(delta.norm(dim=1).mean()),
            "attack_seconds": round(seconds, 2)}


def adaptive_evaluation(view: AttackerView, detectors: list[Detector], x: torch.Tensor | Dataset, y: np.ndarray,
                        predicted: np.ndarray, split: CleanSplit, out: Path, cfg: DetectorEvalConfig) -> AdaptiveEvaluation:
    """Every configured cell (threat model x eps x detector); figures to out/adaptive_*.png."""
    acfg: AdaptiveConfig = cfg.adaptive
    t0 = time.perf_counter()
    real = {d.name: d for d in detectors if d.name in acfg.detectors}
    names = tuple(n for n in acfg.detectors if n in real)
    skipped = {n: "not among the evaluation's detectors (not configured, or no training attacks)"
               for n in acfg.detectors if n not in real}
    sources, targets = attack_plan(y, predicted, split.evaluation, acfg.n_images, acfg.seed)
    x_src, t_src = load_images(x, sources), torch.as_tensor(targets)
    clean = {n: real[n].score(take(x, split.evaluation)) for n in names}
    results: dict = {tm: {eps_label(e): {} for e in acfg.eps} for tm in acfg.threat_models}
    curves: dict = {}
    total = len(acfg.eps) * (("naive" in acfg.threat_models) + len(names) * (len(acfg.threat_models) - ("naive" in acfg.threat_models)))
    bar = tqdm(total=total, desc="adaptive attacks", unit="cell", disable=not cfg.progress)
    with tempfile.TemporaryDirectory(prefix="semguard-graybox-") as tmp:
        own, own_s = {}, 0.0
        if "gray_box" in acfg.threat_models:
            s = time.perf_counter()
            pool = np.setdiff1d(split.evaluation, sources)  # held out from the real detectors, never attacked
            try:
                own = attacker_detectors(view, x, y, predicted, pool, names, cfg, acfg.attacker_seed,
                                         acfg.attacker_sources, Path(tmp))
            except ValueError as e:  # too few held-out images for a guard of its own (tiny worlds): said, not hidden
                skipped["gray_box"] = f"the attacker could not calibrate its own detectors on {len(pool)} images: {e}"
            own_s = time.perf_counter() - s
        for eps in acfg.eps:
            label = eps_label(eps)
            if "naive" in acfg.threat_models:
                spec = AttackSpec("naive_pgd", "pgd", {"eps": eps, "step": eps / 4, "iterations": acfg.iterations},
                                  n_sources=len(sources))
                run = run_attack(view.model, x, sources, targets, spec)
                for n in names:
                    results["naive"][label][n] = cell(real[n], clean[n], view.model, x_src, run.adversarial, targets, run.seconds)
                write_json_atomic(out / "adaptive_partial.json", results)
                bar.update()
            for tm, attacked in (("white_box", real), ("gray_box", own)):
                if tm not in acfg.threat_models:
                    continue
                for n in (n for n in names if n in attacked):
                    adv, runs = strongest(surrogate_of(view.model, attacked[n]), x_src, t_src, eps, acfg)
                    c = cell(real[n], clean[n], view.model, x_src, adv, targets, sum(r.seconds for r in runs))
                    c.update(modes=list(acfg.modes), gradient=gradient_stats(runs),
                             by_mode={m: float(r.evaded.mean()) for m, r in zip(acfg.modes, runs)})
                    if tm == "gray_box":
                        c.update(evasion_own_detector=float(np.max([r.evaded for r in runs], 0).mean()),
                                 attacker_calibration_seconds=round(own_s, 1))
                    results[tm][label][n] = c
                    write_json_atomic(out / "adaptive_partial.json", results)  # a long run's finished cells so far
                    if n == names[0]:  # loss curves of the first detector (the shipped guard)
                        curves[(tm, label, n)] = [r.traces[0] for r in runs]
                    bar.update()
    bar.close()
    (out / "adaptive_partial.json").unlink(missing_ok=True)  # complete: detector_eval.json holds the results
    plot_evasion(out / "adaptive_evasion.png", results)
    plot_loss_curves(out / "adaptive_loss_curves.png", curves, acfg.modes)
    settings = {"n_images": len(sources), "iterations": acfg.iterations, "step": "eps/4", "modes": list(acfg.modes),
                "restarts": acfg.restarts, "eps": [eps_label(e) for e in acfg.eps], "detectors": list(names),
                "skipped": skipped, "attacker_seed": acfg.attacker_seed, "attacker_sources": acfg.attacker_sources,
                "evasion": "share of attacked images that reach the target and are not flagged at the calibrated threshold",
                "figures": ["adaptive_evasion.png", "adaptive_loss_curves.png"]}
    return AdaptiveEvaluation(results, settings, round(time.perf_counter() - t0, 2))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_evasion(path: Path, results: dict) -> Path:
    """Evasion against eps, one panel per threat model, one line per detector."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.4 * len(results), 3.8), squeeze=False, sharey=True)
    for ax, (tm, by_eps) in zip(axes[0], results.items()):
        labels = sorted(by_eps, key=lambda e: float(Fraction(e)))  # increasing eps whatever the configured order
        for det in dict.fromkeys(d for cells in by_eps.values() for d in cells):
            cells = [by_eps[e].get(det, {}) for e in labels]
            value = np.array([c.get("evasion", np.nan) for c in cells])
            ci = np.array([c.get("evasion_ci95", [np.nan, np.nan]) for c in cells]).T  # (2, eps)
            ax.errorbar(range(len(labels)), value, yerr=np.abs(ci - value), fmt="o-", capsize=3, label=det)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(tm.replace("_", "-"))
        ax.set_xlabel("L-inf eps")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("evasion (target reached, not flagged)")
    drawn = [ax for ax in axes[0] if ax.lines]  # a panel may be empty (gray-box skipped)
    if drawn:
        max(drawn, key=lambda ax: len(ax.lines)).legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curves(path: Path, curves: dict, modes: tuple[str, ...]) -> Path:
    """Per attacked cell (first run of each mode): cross-entropy to the target, mean exact score, evasion so far."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for (tm, label, det), traces in curves.items():
        for mode, t in zip(modes, traces):
            name = f"{tm} {label} {det} {mode}"
            for ax, v in zip(axes, (t.ce, t.score, t.evaded_best)):
                ax.plot(np.arange(1, len(v) + 1), v, lw=1, label=name)
    for ax, title in zip(axes, ("cross-entropy to the target", "mean detector score (attacked detector)",
                                "evading so far (attacked detector)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PGD step")
        ax.grid(alpha=0.3)
    if len(curves) * len(modes) <= 16:
        axes[2].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_adaptive(adaptive: dict) -> str:
    """The table: one row per threat model, eps and detector."""
    lines = ["threat model  eps     detector                success  evasion  tpr@5%   L-inf*255  L2     seconds"]
    for tm, by_eps in adaptive.items():
        for label, cells in by_eps.items():
            for det, c in cells.items():
                lines.append(f"{tm:<13s} {label:<7s} {det:<23s} {c['attack_success']:7.2f}  {c['evasion']:7.2f}  "
                             f"{c['tpr_at_5fpr']:6.2f}   {c['mean_linf'] * 255:8.2f}  {c['mean_l2']:5.2f}  {c['attack_seconds']:7.1f}")
    return "\n".join(lines)
