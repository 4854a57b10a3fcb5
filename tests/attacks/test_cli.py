"""`semguard attack generate` end to end on the tiny model (the world loader replaced)."""
import subprocess
import sys

import pytest

from semguard.attacks import cli as attacks_cli
from semguard.attacks.generate import GenerateParams
from semguard.attacks.store import load_attack_set
from semguard.cli import build_parser, main
from tests.attacks.tiny import tiny_world


def test_generate_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(attacks_cli, "_world_inputs", lambda cache: tiny_world())
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
    code = ("import sys; from semguard.cli import build_parser; import semguard.attacks.generate, semguard.attacks.cli; "
            "build_parser().parse_args(['attack', 'generate', '--out', 'o']); assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
