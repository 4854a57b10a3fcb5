"""A reduced `semguard quickstart` end to end: shapes and sanity of summary.json, real figures."""
import json

import numpy as np
import pytest

from semguard.evaluation.adaptive_eval import QUICKSTART_ADAPTIVE, THREAT_MODELS, AdaptiveConfig
from semguard.evaluation.detector_eval import AttackSpec, DetectorEvalConfig
from semguard.analysis.quickstart import STAGES, QuickstartConfig, Timer, run_quickstart
from semguard.analysis.report import render_summary
from semguard.attacks.generate import GenerateParams
from semguard.detector.calibrate import CalibrationConfig
from semguard.detector.guard import Guard
from semguard.world import WorldSettings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL_WORLD = WorldSettings(  # learns to ~0.65 test accuracy in ~16 s on one core
    n_classes=10, train_per_class=100, test_per_class=6, epochs=40, batch_size=64, corpus_sentences=4000, w2v_epochs=3
)


FAST = dict(n_sources=10, batch_size=16)
SMALL_DETECTOR = DetectorEvalConfig(
    detector=CalibrationConfig(per_concept=1, target_fpr=0.1, batch_size=64, method="gaussian"),
    attacks=(AttackSpec("mifgsm_paper", "mifgsm", {"eps": 0.15, "step": 0.03, "iterations": 5}, **FAST),),
    train_attacks=(), art_layer=None,
    # the quickstart's reduced adaptive stage, smaller still (the gaussian flagger needs no training attacks)
    adaptive=AdaptiveConfig(eps=(8 / 255,), detectors=("detector",), n_images=4, iterations=3, modes=("combined",)),
)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    config = QuickstartConfig(
        out=root / "out", cache_dir=root / "cache", world=SMALL_WORLD, image_sets=3, n_permutations=50,
        attack=GenerateParams(n_sources=5, iterations=5, batch_size=16), detector=SMALL_DETECTOR, progress=False,
    )
    return config, run_quickstart(config)


def test_summary_has_every_section_with_consistent_shapes(quickstart):
    config, summary = quickstart
    on_disk = json.loads((config.out / "summary.json").read_text())
    assert on_disk["two_vs_two"]["accuracy"] == summary["two_vs_two"]["accuracy"]
    assert len(on_disk["world"]["classes"]) == 10
    assert 0.0 <= on_disk["world"]["test_accuracy"] <= 1.0
    t = on_disk["two_vs_two"]
    n_layers = len(t["layers"])
    assert n_layers >= 10 and t["layers"][0] != "pixels"
    for key in ("accuracy", "spread", "p_value", "p_bhy"):
        assert len(t[key]) == n_layers
    assert all(0.0 <= a <= 1.0 for a in t["accuracy"]) and 0.0 <= t["pixels"] <= 1.0
    assert all(1 / 51 - 1e-12 <= p <= 1.0 for p in t["p_value"])  # +1-corrected with 50 permutations
    assert all(b >= p - 1e-12 for b, p in zip(t["p_bhy"], t["p_value"]))
    a = on_disk["attacks"]
    # 6 targets per source; a source needs a correctly classified test image, so at most 5 sources
    assert 6 <= a["requested"] <= 30 and a["requested"] % 6 == 0 and a["eps"] == 0.15
    assert 0 <= a["succeeded"] <= a["requested"]
    adv = on_disk["adversarial_one_vs_two"]
    assert adv["layers"] == t["layers"] and len(adv["accuracy"]) == n_layers
    assert set(adv["by_rank"]) <= {str(r) for r in range(6)}
    assert adv["count"] == a["succeeded"]
    mis = on_disk["misclassified"]
    assert mis["count"] >= 1 and -1.0 <= mis["mean_cosine"] <= 1.0
    d = on_disk["detector"]
    for key in ("auroc", "tpr_at_5fpr", "fpr_realised", "signature_only_auroc"):
        assert 0.0 <= d[key] <= 1.0
    assert 0.0 <= d["baselines"]["mahalanobis"]["auroc"] <= 1.0
    assert set(on_disk["timings_s"]) >= {"world", "two_vs_two", "attacks", "one_vs_two", "detector"}


def test_summary_has_the_adaptive_threat_models(quickstart):
    config, summary = quickstart
    d = json.loads((config.out / "summary.json").read_text())["detector"]
    a = d["adaptive"]
    assert list(a) == list(THREAT_MODELS) == ["naive", "white_box", "gray_box"]  # the contract's names
    # this world leaves the gray-box attacker 26 held-out images, too few for a guard of its own: said so
    gray_skipped = "gray_box" in d["adaptive_settings"]["skipped"]
    assert gray_skipped or "detector" in a["gray_box"]["8/255"]
    for tm in THREAT_MODELS[: 2 if gray_skipped else 3]:
        c = a[tm]["8/255"]["detector"]
        assert 0.0 <= c["evasion"] <= c["attack_success"] <= 1.0 and c["n"] >= 1
        assert c["mean_linf"] <= 8 / 255 + 1e-6 and c["attack_seconds"] >= 0
    assert (config.out / "adaptive_evasion.png").read_bytes()[:8] == PNG_MAGIC
    assert "### Attackers who know the guard" in (config.out / "report.md").read_text()
    assert "adaptive, 8/255" in render_summary(summary, config.out)
    # the default quickstart runs the reduced adaptive evaluation
    assert QuickstartConfig(out=config.out).detector.adaptive == QUICKSTART_ADAPTIVE


def test_the_guard_bundle_loads_and_inspects(quickstart):
    config, summary = quickstart
    guard = Guard.load(config.out / "bundle")
    assert guard.info.labels == summary["world"]["classes"]
    verdicts = guard.inspect(np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32))
    assert len(verdicts) == 2 and verdicts[0].signature.shape == (len(guard.info.layers),)


def test_figures_are_real_pngs_and_the_report_shows_them(quickstart):
    config, _ = quickstart
    report = (config.out / "report.md").read_text()
    for name in ("two_vs_two_by_layer.png", "adversarial_one_vs_two_by_layer.png",
                 "misclassified_one_vs_two_by_block.png", "detector_roc.png"):
        data = (config.out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        assert f"]({name})" in report


def test_second_run_reuses_the_world_and_gives_the_same_figures(quickstart):
    config, first = quickstart
    second = run_quickstart(config)
    assert second["timings_s"]["world"] < first["timings_s"]["world"] or first["timings_s"]["world"] < 1
    for section in ("two_vs_two", "adversarial_one_vs_two", "misclassified"):
        np.testing.assert_array_equal(second[section]["accuracy"], first[section]["accuracy"])
    assert second["two_vs_two"]["p_value"] == first["two_vs_two"]["p_value"]


def test_attack_analyze_command_on_the_quickstart_attack_set(quickstart, tmp_path, monkeypatch, capsys):
    from semguard.world import inputs as world_inputs
    from semguard.cli import main

    config, summary = quickstart
    small = world_inputs.load_world_inputs(SMALL_WORLD, config.cache_dir, progress=False)
    monkeypatch.setattr(world_inputs, "load_world_inputs", lambda *args, **kwargs: small)
    args = ["attack", "analyze", "--attack-set", summary["attacks"]["path"], "--out", str(tmp_path), "--permutations", "50"]
    assert main(args) == 0
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    assert analysis["adversarial_one_vs_two"]["accuracy"] == summary["adversarial_one_vs_two"]["accuracy"]
    assert (tmp_path / "adversarial_one_vs_two_by_layer.png").read_bytes()[:8] == PNG_MAGIC
    assert "misclassified_count" in capsys.readouterr().out
    other = world_inputs.WorldInputs(small.world, type(small.model)(small.model.config).eval(), small.word_vectors)
    monkeypatch.setattr(world_inputs, "load_world_inputs", lambda *args, **kwargs: other)
    with pytest.raises(SystemExit, match="another model"):
        main(args)


def test_code_fingerprint_follows_the_code(tmp_path):
    from semguard.analysis.quickstart import DETECTOR_CODE, code_fingerprint

    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "one.py").write_text("z = 3\n")
    first = code_fingerprint(("pkg", "one.py"), tmp_path)
    assert code_fingerprint(("pkg", "one.py"), tmp_path) == first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    assert code_fingerprint(("pkg", "one.py"), tmp_path) != first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    assert code_fingerprint(("pkg", "one.py"), tmp_path) == first
    assert len(code_fingerprint(DETECTOR_CODE)) == 16  # the repository's own files exist


def test_closing_summary_names_the_figures_and_the_next_command(quickstart):
    config, summary = quickstart
    screen = render_summary(summary, config.out).splitlines()
    assert len(screen) <= 24  # one screen
    t, a = summary["two_vs_two"], summary["attacks"]
    text = "\n".join(screen)
    assert f"test accuracy {summary['world']['test_accuracy']:.3f}" in text
    assert f"pixels {t['pixels']:.3f} | first layer {t['accuracy'][0]:.3f} | last layer {t['accuracy'][-1]:.3f}" in text
    assert f"{a['succeeded']} of {a['requested']} reached their target" in text
    auroc = summary["detector"]["per_attack"]["mifgsm_paper"]["auroc"]
    assert f"MI-FGSM paper eps {auroc:.3f}" in text
    assert f"semguard serve --bundle {config.out / 'bundle'}" in text


def test_overall_progress_line_counts_stages_and_scales_what_is_left():
    timer = Timer(progress=False)
    first = timer.progress_line("world")
    assert first.startswith(f"quickstart [1/{len(STAGES)}] the embedded world | 0:00 elapsed")
    timer.seconds["world"] = 2 * STAGES["world"][1]  # this machine runs at half the reference speed
    left = 2 * sum(seconds for name, (_, seconds) in STAGES.items() if name != "world")
    line = timer.progress_line("test_accuracy")
    assert line.startswith(f"quickstart [2/{len(STAGES)}] test accuracy")
    assert line.endswith(f"about {int(left // 60)}:{int(left % 60):02d} left")


def test_report_and_screen_start_with_the_subject_and_summary_json_keeps_its_keys(quickstart):
    config, summary = quickstart
    header = json.loads((config.out / "subject.json").read_text())
    assert header["accuracy"] == pytest.approx(summary["world"]["test_accuracy"])
    assert header["images_analysed"] == summary["world"]["test_images"] == header["images_read"]
    side = header["preprocessing"]["input_size"]
    report = (config.out / "report.md").read_text().splitlines()
    assert report[3] == "subject: worldnet (weights " + header["weights"] + ")"
    assert f"{side} x {side}, images as stored; normalised with mean (0.5, 0.5, 0.5)" in report[4]
    assert f"top-1 accuracy {header['accuracy']:.3f} on the {header['images_analysed']} images analysed" in report[7]
    screen = render_summary(summary, config.out, header).splitlines()
    assert screen[0].startswith("subject: worldnet") and len(screen) <= 24
    on_disk = json.loads((config.out / "summary.json").read_text())  # the header is not in summary.json
    assert set(on_disk) == {"world", "two_vs_two", "attacks", "adversarial_one_vs_two", "misclassified", "detector",
                            "timings_s"}
    assert "skipped" not in on_disk["misclassified"] and "skipped" not in on_disk["adversarial_one_vs_two"]
