"""Guard-aware targeted PGD: combined loss with a per-image lambda search, and orthogonal PGD.

    result = guard_pgd(surrogate, images, targets, GuardAttackConfig(mode="combined"))
    result.evaded   # (B,) bool: the exact Guard predicts the target AND does not flag the image

Modes (gradients from `attacks.adaptive.GuardSurrogate`, success always from the exact `Guard`):

  "naive"       PGD on CE(target) alone: the attacker ignores the guard (lambda = 0).
  "combined"    PGD on CE(target) + lambda * detector loss (Carlini & Wagner, AISec 2017, "Adversarial
                examples are not easily detected", section 3: the detector's output added to the attack
                loss); lambda per image by binary search over `lambdas` (C&W's search on their constant c):
                the smallest grid lambda whose run evades, more where it does not.
  "orthogonal"  Orthogonal PGD (Bryniarski, Hingun, Pachuca, Wang & Carlini, ICLR 2022, "Evading
                adversarial example detectors with orthogonal projected gradient descent", section 4,
                the orthogonal variant, not the selective one): while the image is not yet classified
                as the target, step on the classifier gradient with its component along the detector
                gradient removed; once it is, step on the detector gradient with its component along
                the classifier gradient removed, so neither step undoes the other's progress.

Detector losses ("objective"): "score" the guard's score (every member); "mahalanobis" the surprise
of the member that weighs Mahalanobis columns only; "signature" the first member's logit from its
fraction and margin columns only (what the semantic signature alone contributes).

Every run keeps, per image, the iterate the guard likes best: at the target with the lowest exact
score (the surrogate's forward is the guard's; the final verdict is re-read from `Guard.inspect_arrays`).
Norms: L-inf (sign steps, `attacks.common.linf_step`) and L2 (normalised steps, projection on the ball).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from semguard.attacks.adaptive import GuardSurrogate, SurrogateOutput
from semguard.attacks.common import CLIP_VALUES, check_images_targets, linf_step

MODES = ("naive", "combined", "orthogonal")
OBJECTIVES = ("score", "mahalanobis", "signature")
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class GuardAttackConfig:
    mode: str = "combined"
    objective: str = "score"
    norm: str = "linf"
    eps: float = 8 / 255
    step: float | None = None  # None: eps / 4 (Madry et al.'s 2/255 at 8/255)
    iterations: int = 100
    restarts: int = 1  # runs per image; the first from the clean image, the others from uniform points of the ball
    # lambda grid (detector loss in nats of surprise vs cross-entropy): binary-searched per image, C&W style
    lambdas: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, allowed in (("mode", self.mode, MODES), ("objective", self.objective, OBJECTIVES),
                                     ("norm", self.norm, NORMS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not self.eps > 0 or (self.step is not None and not self.step > 0):
            raise ValueError(f"eps and step must be > 0, got {self.eps}, {self.step}")
        if self.iterations < 1 or self.restarts < 1 or not self.lambdas or min(self.lambdas) <= 0:
            raise ValueError("iterations and restarts must be >= 1 and lambdas a non-empty tuple of values > 0")

    @property
    def step_size(self) -> float:
        return self.step if self.step is not None else self.eps / 4


class Trace(NamedTuple):
    ce: np.ndarray  # (T,) mean cross-entropy to the target over the batch, per iteration
    score: np.ndarray  # (T,) mean exact guard score
    evading: np.ndarray  # (T,) share of images evading at that iterate (surrogate forward = guard)
    evaded_best: np.ndarray  # (T,) share of images with an evading iterate so far
    grad_norm: np.ndarray  # (T, B) L2 norm of d(detector loss)/dx per image
    evading_now: np.ndarray  # (T, B) bool: the image evades at that iterate (its detector gradient no longer matters)


class GuardAttackResult(NamedTuple):
    adversarial: torch.Tensor  # (B, 3, H, W) in [0, 1]
    reached: np.ndarray  # (B,) exact guard predicts the target
    evaded: np.ndarray  # (B,) reached and not flagged
    score: np.ndarray  # (B,) exact guard score
    lam: np.ndarray  # (B,) lambda of the kept run (0 for naive, nan for orthogonal)
    linf: np.ndarray  # (B,) max |adversarial - clean|
    traces: list[Trace]  # one per run (lambda round x restart)
    seconds: float


def detector_loss(out: SurrogateOutput, surrogate: GuardSurrogate, objective: str) -> torch.Tensor:
    """(B,) the detector loss the attacker lowers (see module docstring)."""
    if objective == "score":
        return out.score
    if objective == "signature":
        return out.signature_logit
    only = [e for e, kinds in enumerate(surrogate.members) if kinds == ("mahalanobis",)]
    if not only:
        raise ValueError(f"objective 'mahalanobis' needs a Mahalanobis-only member, the bundle has {surrogate.members}")
    return out.surprise[:, only[0]]


def _project_out(g: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Per image (B, ...): g minus its component along `direction` (zero directions leave g as it is)."""
    gf, df = g.flatten(1), direction.flatten(1)
    coef = (gf * df).sum(1) / (df * df).sum(1).clamp_min(1e-30)
    return (gf - coef[:, None] * df).view_as(g)


def _step(x: torch.Tensor, descent: torch.Tensor, x_clean: torch.Tensor, cfg: GuardAttackConfig) -> torch.Tensor:
    """One step along `descent` (B, ...), back into the eps ball around x_clean and [0, 1]."""
    if cfg.norm == "linf":
        return linf_step(x, descent, x_clean, cfg.eps, cfg.step_size)
    unit = descent / descent.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    delta = (x + cfg.step_size * unit).clamp(*CLIP_VALUES) - x_clean
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x_clean + delta * torch.clamp(cfg.eps / norm, max=1.0)).clamp(*CLIP_VALUES)


def _random_start(x_clean: torch.Tensor, cfg: GuardAttackConfig, gen: torch.Generator) -> torch.Tensor:
    noise = torch.rand(x_clean.shape, generator=gen) * 2 - 1  # uniform in the L-inf ball; scaled into the L2 one
    if cfg.norm == "l2":
        noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * cfg.eps * torch.rand(len(x_clean), 1, 1, 1, generator=gen)
    else:
        noise = noise * cfg.eps
    return (x_clean + noise).clamp(*CLIP_VALUES)


def _run(surrogate: GuardSurrogate, x_clean: torch.Tensor, x0: torch.Tensor, targets: torch.Tensor,
         lam: torch.Tensor, cfg: GuardAttackConfig) -> tuple[torch.Tensor, Trace]:
    """One PGD run; returns the best iterate per image (at the target, lowest score) and its trace."""
    x, best = x0.clone(), x0.clone()
    best_key = torch.full((len(x),), math.inf, dtype=torch.float64)
    ever = torch.zeros(len(x), dtype=torch.bool)
    rows = {k: [] for k in Trace._fields}
    for _ in range(cfg.iterations):
        x.requires_grad_(True)
        out = surrogate(x)
        ce = F.cross_entropy(out.logits, targets, reduction="none")
        det = detector_loss(out, surrogate, cfg.objective)
        g_d = torch.autograd.grad(det.sum(), x, retain_graph=True)[0] if cfg.mode != "naive" else torch.zeros_like(x)
        g_c = torch.autograd.grad(ce.sum(), x)[0]
        with torch.no_grad():
            reached = out.logits.argmax(1) == targets
            score = out.score.detach()
            key = torch.where(reached, score, torch.full_like(score, math.inf))  # the best iterate of the run so far
            better = key < best_key
            best[better], best_key[better] = x.detach()[better], key[better]
            evading = reached & (score <= surrogate.threshold)
            ever |= evading
            for name, v in (("ce", ce.mean()), ("score", score.mean()), ("evading", evading.double().mean()),
                            ("evaded_best", ever.double().mean())):
                rows[name].append(float(v))
            rows["grad_norm"].append(g_d.flatten(1).norm(dim=1).numpy())
            rows["evading_now"].append(evading.numpy())
            if cfg.mode == "orthogonal":
                grad = torch.where(reached.view(-1, 1, 1, 1), _project_out(g_d, g_c), _project_out(g_c, g_d))
            else:
                grad = g_c + lam.to(g_c.dtype).view(-1, 1, 1, 1) * g_d
            x = _step(x.detach(), -grad, x_clean, cfg)
    with torch.no_grad():  # the last iterate too
        out = surrogate(x)
        reached = out.logits.argmax(1) == targets
        key = torch.where(reached, out.score, torch.full_like(out.score, math.inf))
        better = key < best_key
        best[better], best_key[better] = x[better], key[better]
        best[torch.isinf(best_key)] = x[torch.isinf(best_key)]  # never at the target: the last iterate
    if cfg.mode == "naive":
        best = x  # plain PGD: its last iterate, chosen without looking at the guard
    return best, Trace(*(np.array(rows[k]) for k in Trace._fields))


def _verdict(surrogate: GuardSurrogate, x: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reached, evaded, score) from the exact detector (`surrogate.verdict`: the Guard, or ART's detect)."""
    out = surrogate.verdict(x)
    reached = out.predicted == targets.numpy()
    return reached, reached & ~out.flagged, out.score


def _attack_runs(surrogate, x_clean, targets, lam, cfg, gen) -> tuple[torch.Tensor, list[Trace]]:
    """Best over restarts (evading first, then lowest exact score at the target)."""
    best, traces, best_key = x_clean.clone(), [], np.full(len(x_clean), np.inf)
    for r in range(cfg.restarts):
        x0 = x_clean if r == 0 else _random_start(x_clean, cfg, gen)
        adv, trace = _run(surrogate, x_clean, x0, targets, lam, cfg)
        traces.append(trace)
        reached, evaded, score = _verdict(surrogate, adv, targets)
        key = np.where(evaded, score - 1e9, np.where(reached, score, np.inf))
        take = (key < best_key) | (r == 0) if cfg.mode != "naive" else np.full(len(key), r == 0)  # naive: no choosing
        best[torch.from_numpy(take)] = adv[torch.from_numpy(take)]
        best_key = np.where(take, key, best_key)
    return best, traces


def guard_pgd(surrogate: GuardSurrogate, images: torch.Tensor, targets: torch.Tensor,
              cfg: GuardAttackConfig = GuardAttackConfig()) -> GuardAttackResult:
    """Attack images (B, 3, H, W) in [0, 1] towards targets (B,) against the guard behind `surrogate`."""
    check_images_targets(images, targets)
    start, gen = time.perf_counter(), torch.Generator().manual_seed(cfg.seed)
    x_clean, targets = images.detach(), targets.long()
    b, grid = len(images), np.asarray(sorted(cfg.lambdas), dtype=np.float64)
    if cfg.mode != "combined":
        lam_value = 0.0 if cfg.mode == "naive" else math.nan
        adv, traces = _attack_runs(surrogate, x_clean, targets, torch.zeros(b, dtype=torch.float64), cfg, gen)
        lam = np.full(b, lam_value)
    else:  # binary search over the grid, per image: evades -> try smaller, else larger
        adv, traces, lam = x_clean.clone(), [], np.full(b, np.nan)
        lo, hi = np.zeros(b, int), np.full(b, len(grid) - 1)
        found, fail_key = np.zeros(b, bool), np.full(b, np.inf)
        while (active := np.flatnonzero(lo <= hi)).size:
            mid = (lo[active] + hi[active]) // 2
            sel = torch.from_numpy(active)
            x, t = _attack_runs(surrogate, x_clean[sel], targets[sel], torch.from_numpy(grid[mid]), cfg, gen)
            traces += t
            reached, evaded, score = _verdict(surrogate, x, targets[sel])
            key = np.where(reached, score, np.inf)  # among failures, keep the one at the target with the lowest score
            keep = evaded | (~found[active] & (key <= fail_key[active]))  # an evading run replaces any failure
            fail_key[active] = np.where(keep & ~evaded, key, fail_key[active])
            adv[sel[torch.from_numpy(keep)]] = x[torch.from_numpy(keep)]
            lam[active[keep]] = grid[mid][keep]
            found[active] |= evaded
            hi[active] = np.where(evaded, mid - 1, hi[active])
            lo[active] = np.where(evaded, lo[active], mid + 1)
    reached, evaded, score = _verdict(surrogate, adv, targets)
    linf = (adv - x_clean).abs().flatten(1).max(1).values.numpy()
    return GuardAttackResult(adv, reached, evaded, score, lam, linf, traces, time.perf_counter() - start)
