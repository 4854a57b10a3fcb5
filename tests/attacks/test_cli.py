"""`semguard attack generate` end to end on the tiny model (the world loader replaced)."""
import subprocess
import sys

import pytest

from semguard.commands import attack as attacks_cli
from semguard.attacks.generate import GenerateParams
from semguard.attacks.store import load_attack_set
from semguard.cli import build_parser, main
from semguard.subject.core import subject_record, subject_spec_from_record
import semguard.subject.core as subject_core
from tests.attacks.tiny import as_world_subject, tiny_world


def test_generate_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(subject_core, "world_subject", as_world_subject(tiny_world()))
    argv = ["attack", "generate", "--out", str(tmp_path / "set"), "--sources", "3", "--iterations", "4",
            "--batch-size", "9", "--seed", "1"]
    assert main(argv) == 0
    s = load_attack_set(tmp_path / "set")
    assert s.complete and len(s) == 18 and s.header["generate"]["seed"] == 1
    assert "attacks succeeded (2 shards computed, 0 already done)" in capsys.readouterr().out
    assert main(argv) == 0
    assert "(0 shards computed, 2 already done)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="different parameters"):
        main(argv[:-2] + ["--seed", "2"])


def test_generate_command_bad_flags(tmp_path):
    with pytest.raises(SystemExit, match="eps must be a finite number > 0"):
        main(["attack", "generate", "--out", str(tmp_path / "x"), "--eps", "0"])
    assert not (tmp_path / "x").exists()
    params = attacks_cli.params_from_args(build_parser().parse_args(["attack", "generate", "--out", "o"]))
    assert params == GenerateParams()
    assert (params.eps, params.step, params.decay, params.iterations, params.backend) == (0.15, 0.03, 1.0, 20, "native")


def test_ray_is_imported_only_with_ray_flag():
    code = ("import sys; from semguard.cli import build_parser; import semguard.attacks.generate, semguard.commands.attack; "
            "build_parser().parse_args(['attack', 'generate', '--out', 'o']); assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- a subject (semguard.subject)

SUBJECT_FLAGS = ["--model", "resnet18", "--weights", "w.pth", "--images", "imgs", "--labels", "labels.txt",
                 "--vectors", "vectors.bin"]


def tiny_subject(spec, progress=True):
    """A semguard.subject.Subject over the tiny world; the last two classes have no word vector."""
    import numpy as np

    from semguard.models.factory import ModelSpec
    from semguard.subject.core import ArrayImages, Subject

    model, images, labels, names, vectors = tiny_world()
    matched = np.ones(len(names), bool)
    matched[-2:] = False
    words = np.where(matched[:, None], vectors, 0.0).astype(np.float32)
    return Subject("tiny", model, ModelSpec("tiny", {}), ["2", "5"], names, words, matched,
                   ArrayImages(images, labels), spec, None)


@pytest.fixture
def on_tiny_subject(monkeypatch):
    import semguard.subject.core as core

    monkeypatch.setattr(core, "load_subject", tiny_subject)


def test_generate_on_a_subject_records_it(tmp_path, monkeypatch, on_tiny_subject, capsys):
    monkeypatch.chdir(tmp_path)  # the relative paths of the flags resolve against the working directory
    argv = ["attack", "generate", "--out", "set", *SUBJECT_FLAGS, "--sources", "4", "--iterations", "2",
            "--batch-size", "8"]
    assert main(argv) == 0
    s = load_attack_set(tmp_path / "set")
    recorded = s.header["subject"]
    assert recorded["model"] == "resnet18" and recorded["weights"] == str(tmp_path / "w.pth")
    assert recorded["images"] == str(tmp_path / "imgs") and recorded["vectors"] == str(tmp_path / "vectors.bin")
    assert subject_spec_from_record(recorded).images == tmp_path / "imgs"
    n = len(tiny_world()[3])
    assert all(r.source_class < n - 2 and r.target_class < n - 2 for r in s.records)  # only classes with a vector
    assert s.complete and "0 already done" in capsys.readouterr().out
    assert main(argv) == 0  # resumed: same subject
    assert "already done" in capsys.readouterr().out


def test_resumed_set_must_name_the_same_subject(tmp_path, monkeypatch, on_tiny_subject):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subject_core, "world_subject", as_world_subject(tiny_world()))
    small = ["--sources", "2", "--iterations", "1", "--batch-size", "8"]
    assert main(["attack", "generate", "--out", "subject-set", *SUBJECT_FLAGS, *small]) == 0
    other = [*SUBJECT_FLAGS[:5], "other-imgs", *SUBJECT_FLAGS[6:]]
    with pytest.raises(SystemExit, match=r"made on another subject \(images: .*imgs' there, .*other-imgs' now\)"):
        main(["attack", "generate", "--out", "subject-set", *other, *small])
    with pytest.raises(SystemExit, match="made on another subject"):
        main(["attack", "generate", "--out", "subject-set", *small])  # the world, into a subject's set
    assert main(["attack", "generate", "--out", "world-set", *small]) == 0
    with pytest.raises(SystemExit, match="made on the embedded world; this run names another subject"):
        main(["attack", "generate", "--out", "world-set", *SUBJECT_FLAGS, *small])


def test_world_sets_resume_as_before(tmp_path, monkeypatch, capsys):
    """A world set records the world; an older one without a subject record and another --world-cache still resume."""
    import json

    monkeypatch.setattr(subject_core, "world_subject", as_world_subject(tiny_world()))
    argv = ["attack", "generate", "--out", str(tmp_path / "set"), "--sources", "2", "--iterations", "1",
            "--batch-size", "8", "--world-cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    params = tmp_path / "set" / "params.json"
    header = json.loads(params.read_text())
    assert header["subject"]["world_cache"] == str(tmp_path / "cache") and header["subject"]["model"] is None
    assert main(argv[:-1] + [str(tmp_path / "elsewhere")]) == 0  # same model, another cache: resumed
    assert "already done" in capsys.readouterr().out
    del header["subject"]  # a set written before sets recorded their subject
    params.write_text(json.dumps(header))
    assert main(argv) == 0
    assert "already done" in capsys.readouterr().out and "subject" not in json.loads(params.read_text())


def test_analyze_takes_the_subject_the_set_records(tmp_path, monkeypatch):
    from pathlib import Path

    from semguard.commands.attack import attack_set_subject
    from semguard.subject.core import SubjectSpec

    monkeypatch.chdir(tmp_path)
    spec = SubjectSpec(model="resnet18", weights=Path("w.pth"), images=Path("imgs"), labels=Path("l.txt"),
                       vectors=Path("v.bin"), input_size=64, mean=(0.5, 0.5, 0.5))
    record = subject_record(spec)
    assert record["images"] == str(tmp_path / "imgs") and record["mean"] == [0.5, 0.5, 0.5]
    parse = build_parser().parse_args
    args = parse(["attack", "analyze", "--attack-set", "s", "--out", "o"])
    again = attack_set_subject(args, {"subject": record})  # nothing but the set
    assert again.images == tmp_path / "imgs" and again.mean == (0.5, 0.5, 0.5) and again.input_size == 64
    assert subject_record(again) == record
    assert attack_set_subject(args, {}).is_world()  # a set written before sets recorded their subject
    world = subject_record(SubjectSpec(world_cache=Path("recorded")))
    assert attack_set_subject(args, {"subject": world}).world_cache == tmp_path / "recorded"
    moved = parse(["attack", "analyze", "--attack-set", "s", "--out", "o", "--world-cache", "moved"])
    assert attack_set_subject(moved, {"subject": world}).world_cache == Path("moved")
    flags = parse(["attack", "analyze", "--attack-set", "s", "--out", "o", "--model", "resnet50", "--weights", "x.pth",
                   "--images", "elsewhere", "--vectors", "v.bin"])
    assert attack_set_subject(flags, {"subject": record}).images == Path("elsewhere")  # flags name the subject: theirs
    with pytest.raises(ValueError, match="keys this semguard does not know"):
        subject_spec_from_record({**record, "colour": 1})


# ----------------------------------------------------------------------------- the exported world


def small_world(root, n_classes: int = 8, per_class: int = 6):
    """A world as `semguard world export` writes one, without training: a random WorldNet with a least-squares
    head on colour-coded 32 x 32 images, CIFAR-100 class names, random word2vec-binary vectors. Returns the
    in-memory world (what attacks.cli._world_inputs gives) and the exported folder."""
    import numpy as np
    import torch
    from gensim.models import KeyedVectors

    from semguard.detector.words import CIFAR100_CLASSES, load_vectors, match_labels
    from semguard.models.worldnet import WorldNet, WorldNetConfig, load_world_model, save_worldnet
    from semguard.world.export import write_world_assets

    torch.manual_seed(0)
    model = WorldNet(WorldNetConfig(num_classes=n_classes, widths=(8, 8, 16), blocks=(1, 1, 1))).eval()
    gen = torch.Generator().manual_seed(1)
    src = torch.arange(n_classes * per_class) % n_classes  # interleaved, as the world's test split
    x = (torch.rand(n_classes, 3, 1, 1, generator=gen)[src] + 0.25 * torch.rand(len(src), 3, 32, 32, generator=gen))
    images = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3)
    with torch.no_grad():
        feats = model.flatten(model.pool(model.stage3(model.stage2(model.stage1(model.stem(x.clamp(0, 1)))))))
        design = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
        w = torch.linalg.lstsq(design, 10.0 * torch.nn.functional.one_hot(src, n_classes).double()).solution
        model.fc.weight.copy_(w[:-1].T.float())
        model.fc.bias.copy_(w[-1].float())
    labels = src.numpy().copy()
    labels[:n_classes // 2] = (labels[:n_classes // 2] + 1) % n_classes  # some first images wrong: not always image 0
    classes = CIFAR100_CLASSES[:n_classes]
    kv = KeyedVectors(16)
    kv.add_vectors(classes + ["the", "of"], np.random.default_rng(2).standard_normal((n_classes + 2, 16)).astype(np.float32))
    kv.save_word2vec_format(str(root / "vectors.bin"), binary=True)
    save_worldnet(model, root / "worldnet.safetensors")
    export = write_world_assets(root / "export", classes, images, labels, root / "vectors.bin",
                                root / "worldnet.safetensors", progress=False)
    vectors = match_labels(load_vectors(root / "vectors.bin"), classes).vectors
    return (load_world_model(root / "worldnet.safetensors"), images, labels, classes, vectors), export


def test_exported_world_gives_the_same_attacks(tmp_path, monkeypatch):
    """`attack generate` on the world in memory and on its export (PNG folder, labels, word2vec binary, WorldNet
    safetensors, read by the real-asset loaders through --subject) plans the same attacks with the same results."""
    import numpy as np

    world, export = small_world(tmp_path)
    monkeypatch.setattr(subject_core, "world_subject", as_world_subject(world))
    small = ["--sources", "4", "--targets-per-source", "3", "--iterations", "5", "--batch-size", "8",
             "--world-cache", str(tmp_path / "cache")]
    assert main(["attack", "generate", "--out", str(tmp_path / "world-set"), *small]) == 0
    assert main(["attack", "generate", "--out", str(tmp_path / "export-set"), "--subject",
                 str(export / "subject.toml"), *small]) == 0
    a, b = load_attack_set(tmp_path / "world-set"), load_attack_set(tmp_path / "export-set")
    assert b.header["subject"]["model"] == "worldnet" and b.header["subject"]["images"] == str(export / "test")
    assert a.header["model_sha256"] == b.header["model_sha256"]  # the same network, read back from the export
    key = [(r.source_label, r.target_label, r.rank, r.success) for r in a.records]
    assert key == [(r.source_label, r.target_label, r.rank, r.success) for r in b.records] and len(key) >= 6
    assert 0 < sum(r.success for r in a.records) < len(key)
    np.testing.assert_array_equal(a.images(list(a.records)), b.images(list(b.records)))  # the same pixels attacked
