"""summary.json and report.md of a quickstart run."""
from __future__ import annotations

import numpy as np


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


def render_report(summary: dict) -> str:
    """Markdown report of a quickstart summary (the figures sit beside it)."""
    w, t = summary["world"], summary["two_vs_two"]
    lines = [
        "# semguard quickstart report",
        "",
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
    ]


def _has_art(d: dict) -> bool:
    return any("art_binary_activation" in a["baselines"] for a in d["per_attack"].values())
