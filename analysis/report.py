"""summary.json and report.md of a quickstart run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from semguard.subject.header import render_subject_header


def _layer_table(layers, columns: dict[str, list]) -> str:
    head = "| layer | " + " | ".join(columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    rows = [
        f"| {layer} | " + " | ".join(_fmt(col[i]) for col in columns.values()) + " |"
        for i, layer in enumerate(layers)
    ]
    return "\n".join([head, rule, *rows])


def _fmt(x) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (float, np.floating)):
        return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"
    return str(x)


def render_report(summary: dict, header: dict | None = None) -> str:
    """Markdown report of a quickstart summary (the figures sit beside it); header: the subject header
    (semguard.subject.header), shown first."""
    w, t = summary["world"], summary["two_vs_two"]
    lines = [
        "# semguard quickstart report",
        "",
        *(["```", *render_subject_header(header), "```", ""] if header else []),
        f"Embedded world: {len(w['classes'])} concepts, world CNN test accuracy {w['test_accuracy']:.3f}.",
        "",
        "## 2 vs 2 through the layers (paper section 3, Figure 1)",
        "",
        f"Raw pixels: {t['pixels']:.3f} (chance 0.5). Each layer's accuracy is the mean over "
        f"{t['image_sets']} image sets (one distinct image per concept each), with "
        f"{t['n_permutations']} permutations of the word side and BHY correction across layers.",
        "",
        "![2 vs 2 by layer](two_vs_two_by_layer.png)",
        "",
        _layer_table(t["layers"], {
            "2 vs 2": t["accuracy"], "spread across sets": t["spread"],
            "p": t["p_value"], "p (BHY)": t["p_bhy"], "significant": [p < 0.05 for p in t["p_bhy"]],
        }),
    ]
    if "adversarial_one_vs_two" in summary:
        lines += _attack_sections(summary)
    if "detector" in summary:
        lines += _detector_section(summary["detector"])
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items()]
    return "\n".join(lines) + "\n"


def _attack_sections(summary: dict) -> list[str]:
    a, adv, mis = summary["attacks"], summary["adversarial_one_vs_two"], summary["misclassified"]
    by_rank = {f"rank {g}": adv["by_rank"][str(g)] for g in adv["groups"]}
    return [
        "",
        "## 1 vs 2 of adversarial images (paper section 4, Figure 6)",
        "",
        f"Targeted MI-FGSM ({a['backend']}), eps {a['eps']}, step {a['step']}, decay {a['decay']}, "
        f"{a['iterations']} iterations on [0, 1] pixels: {a['succeeded']} of {a['requested']} attacks succeeded "
        "(failures are kept in the manifest and left out here). Accuracy is the fraction of images whose "
        "layer sides with the true (source) label rather than the predicted (target) label; rank 0 is the "
        "target most similar to the source by word vectors. p-values: two-sided, labels swapped per image, BHY across layers.",
        "",
        "![1 vs 2 of adversarial images](adversarial_one_vs_two_by_layer.png)",
        "",
        _layer_table(adv["layers"], {"mean over ranks": adv["accuracy"], **by_rank, "p (BHY)": adv["p_bhy"]}),
        "",
        "## 1 vs 2 of misclassified test images (paper Figures 4 and 5)",
        "",
        f"{mis['count']} misclassified clean test images; mean cosine similarity of true and predicted "
        f"labels' word vectors {mis['mean_cosine']:.3f} (paper: 0.22-0.29 on ImageNet models).",
        "",
        "![1 vs 2 of misclassified images](misclassified_one_vs_two_by_block.png)",
        "",
        _layer_table(mis["layers"], {"1 vs 2": mis["accuracy"], "p": mis["p_value"], "p (BHY)": mis["p_bhy"]}),
    ]


def _detector_section(d: dict) -> list[str]:
    head = ("| attack | successful / attacked | guard AUROC | TPR at 5% FPR | realised FPR | signature alone "
            "| shuffled words | class similarity | Mahalanobis (Lee et al.) |" + (" ART binary |" if _has_art(d) else ""))
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, a in d["per_attack"].items():
        c, b = a.get("controls", {}), a["baselines"]
        cells = [name, f"{a['n_successful']} / {a['n_attacked']}", a["auroc"], a["tpr_at_5fpr"], a["fpr_realised"],
                 a["signature_only_auroc"], c.get("signature_shuffled_words", {}).get("auroc", "-"),
                 c.get("signature_class_similarity", {}).get("auroc", "-"), b["mahalanobis"]["auroc"]]
        if _has_art(d):
            cells.append(b.get("art_binary_activation", {}).get("auroc", "-"))
        rows.append("| " + " | ".join(_fmt(x) for x in cells) + " |")
    return [
        "",
        "## The guard: calibrated on clean images, evaluated on held-out clean and adversarial images",
        "",
        f"Clean test images split per class: {d['split']['n_calibration']} for calibration, "
        f"{d['split']['n_evaluation']} for evaluation; adversarial images come from evaluation images only. "
        f"AUROC of the shipped guard (flagger `{d['detectors']['detector']['method']}` on "
        f"{', '.join(d['detectors']['detector']['features'])}) beside "
        "the semantic signature alone, its controls and the baselines; the supervised detectors trained on "
        f"{', '.join(d.get('train_attacks', {})) or 'no attack'} (calibration images only). The bundle is in `bundle/`.",
        "",
        "![ROC curves](detector_roc.png)",
        "",
        *rows,
        *_adaptive_section(d),
    ]


def _adaptive_section(d: dict) -> list[str]:
    """Attackers who know the guard (`detector.adaptive`): one row per threat model, eps and detector."""
    if "adaptive" not in d:
        return []
    s = d.get("adaptive_settings", {})
    rows = ["| threat model | eps | detector | reaches target | evades (not flagged) | TPR at 5% FPR | mean L-inf | s |",
            "|---|---|---|---|---|---|---|---|"]
    for tm, by_eps in d["adaptive"].items():
        for eps, cells in by_eps.items():
            for det, c in cells.items():
                rows.append(f"| {tm} | {eps} | {det} | {_fmt(c['attack_success'])} | {_fmt(c['evasion'])} | "
                            f"{_fmt(c['tpr_at_5fpr'])} | {c['mean_linf'] * 255:.2f}/255 | {c['attack_seconds']:.0f} |")
    return ["", "### Attackers who know the guard", "",
            f"{s.get('n_images', '?')} held-out images, a random target each, {s.get('iterations', '?')} PGD steps "
            f"({', '.join(s.get('modes', []))}); naive ignores the guard, white-box holds the bundle, gray-box calibrates "
            "a guard of its own (another seed, other clean images) and attacks that. Success and evasion are decided by "
            "the real guard. README \"Threat model\" says what this means.", "", *rows]


def _adaptive_summary(det: dict) -> list[str]:
    """One line: evasion of the shipped guard per threat model at the (first) eps the quickstart attacks."""
    if "adaptive" not in det:
        return []
    parts, eps = [], "?"
    for tm, by_eps in det["adaptive"].items():
        eps, cells = next(iter(by_eps.items()), ("?", {}))
        if "detector" in cells:
            parts.append(f"{tm.replace('_', '-')} {100 * cells['detector']['evasion']:.0f}%")
    return [f"  adaptive, {eps:<7s}   evade the guard: {' | '.join(parts)} (README: Threat model)"] if parts else []


def _has_art(d: dict) -> bool:
    return any("art_binary_activation" in a["baselines"] for a in d["per_attack"].values())


ATTACK_NAMES = {"mifgsm_paper": "MI-FGSM paper eps", "mifgsm_8_255": "MI-FGSM 8/255", "pgd_8_255": "PGD 8/255",
                "cw_l2": "C&W L2"}


def render_summary(summary: dict, out: Path, header: dict | None = None) -> str:
    """The quickstart's closing screen: the subject header (when given), what was measured, where it was
    written, what to try next."""
    world, t, attacks = summary["world"], summary["two_vs_two"], summary["attacks"]
    adv, det = summary["adversarial_one_vs_two"], summary["detector"]
    significant = sum(p < 0.05 for p in t["p_bhy"])
    per_attack = det["per_attack"]
    guard = " | ".join(f"{ATTACK_NAMES.get(a, a)} {r['auroc']:.3f}" for a, r in per_attack.items())
    maha = " | ".join(f"{r['baselines']['mahalanobis']['auroc']:.3f}" for r in per_attack.values())
    total = sum(summary["timings_s"].values())
    lines = [
        *(render_subject_header(header) if header else []),
        f"semguard quickstart: the paper's method on the embedded world ({len(world['classes'])} concepts), "
        f"{int(total // 60)} min {int(total % 60):02d} s",
        f"  world CNN          test accuracy {world['test_accuracy']:.3f}",
        f"  2 vs 2 by layer    pixels {t['pixels']:.3f} | first layer {t['accuracy'][0]:.3f} | last layer "
        f"{t['accuracy'][-1]:.3f} | significant after BHY: {significant} of {len(t['layers'])} layers (chance 0.5)",
        f"  MI-FGSM attacks    {attacks['succeeded']} of {attacks['requested']} reached their target "
        f"(eps {attacks['eps']}, {attacks['iterations']} iterations)",
        f"  1 vs 2, attacked   first layer {adv['accuracy'][0]:.3f} | last layer {adv['accuracy'][-1]:.3f} "
        "(layers siding with the true label; chance 0.5)",
        f"  guard AUROC        {guard}",
        f"  Mahalanobis AUROC  {maha}",
        f"  false positives    {100 * det['fpr_realised']:.1f}% of held-out clean images flagged (target 5%)",
        *_adaptive_summary(det),
        f"written: {out / 'report.md'}, summary.json, the figures (*.png) and the guard bundle {out / 'bundle'}",
        f"next:    semguard serve --bundle {out / 'bundle'}      # the guard as a gRPC service",
        "         semguard detector evaluate --out runs/detector   # the full detector evaluation",
    ]
    return "\n".join(lines)
