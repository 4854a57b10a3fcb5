"""attacks.distributed (and the quickstart's attack stage) on a local 2-CPU Ray cluster: the same files
as one process, resume after kill -9.

Needs semguard[ray]; deselected by default (marker `ray`), .ci/run runs it:
python3 -m pytest -q -m ray tests/attacks/test_ray.py
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from semguard.attacks.generate import GenerateParams, generate_attack_set
from semguard.attacks.store import MANIFEST_FILE, SHARD_DIR, load_attack_set
from semguard.cli import main
from tests.attacks.generate_worker import PARAMS as WORKER_PARAMS
from tests.attacks.generate_worker import start_and_kill
import semguard.subject.core as subject_core
from tests.attacks.tiny import as_world_subject, tiny_world

ray = pytest.importorskip("ray")  # the default run has no Ray; .ci/run installs it and checks the import
from semguard.attacks.distributed import RayParams, generate_attack_set_ray  # noqa: E402 (needs ray)

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
SMALL = GenerateParams(n_sources=5, targets_per_source=6, batch_size=8, iterations=5)


@pytest.fixture(scope="module")
def cluster():
    """A Ray of 2 CPUs on this machine for the module; its GCS address for subprocess drivers."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def files(path: Path) -> dict[str, bytes]:
    """The manifest and every shard, byte for byte (params.json is the same header by construction)."""
    out = {MANIFEST_FILE: (path / MANIFEST_FILE).read_bytes()}
    out.update({p.name: p.read_bytes() for p in sorted((path / SHARD_DIR).iterdir())})
    return out


@pytest.mark.parametrize("actors", [1, 2])
def test_ray_set_equals_single_process_set(cluster, tmp_path, actors):
    world = tiny_world()
    single = generate_attack_set(*world, tmp_path / "single", SMALL, progress=False)
    result = generate_attack_set_ray(*world, tmp_path / "ray", SMALL, RayParams(actors=actors), progress=False)
    assert result == single._replace(out_dir=tmp_path / "ray")
    assert files(tmp_path / "ray") == files(tmp_path / "single")
    assert (tmp_path / "ray" / "params.json").read_bytes() == (tmp_path / "single" / "params.json").read_bytes()


def test_single_process_and_ray_resume_each_other(cluster, tmp_path):
    world, out = tiny_world(), tmp_path / "set"
    generate_attack_set(*world, tmp_path / "single", SMALL, progress=False)
    generate_attack_set(*world, out, SMALL, progress=False)
    (out / SHARD_DIR / "shard-00001.npz").unlink()  # as if a run had stopped before shards 1 and 3
    (out / SHARD_DIR / "shard-00003.npz").unlink()
    resumed = generate_attack_set_ray(*world, out, SMALL, RayParams(actors=2), progress=False)
    assert (resumed.computed, resumed.skipped) == ([1, 3], [0, 2])
    assert load_attack_set(out).complete
    assert sorted(files(out)[MANIFEST_FILE].splitlines()) == sorted(files(tmp_path / "single")[MANIFEST_FILE].splitlines())
    (out / SHARD_DIR / "shard-00002.npz").unlink()
    again = generate_attack_set(*world, out, SMALL, progress=False)
    assert (again.computed, again.skipped) == ([2], [0, 1, 3])
    assert {k: v for k, v in files(out).items() if k != MANIFEST_FILE} == \
        {k: v for k, v in files(tmp_path / "single").items() if k != MANIFEST_FILE}


def test_kill_driver_and_resume_with_ray(cluster, tmp_path):
    out, log = tmp_path / "set", tmp_path / "computed.log"
    finished, stamps = start_and_kill(out, log, cluster)
    cmd = [sys.executable, "-m", "tests.attacks.generate_worker", str(out), str(log)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    n_shards = WORKER_PARAMS.n_sources * WORKER_PARAMS.targets_per_source // WORKER_PARAMS.batch_size
    first_run = log.read_text().split()

    subprocess.run(cmd + ["0", cluster], cwd=ROOT, env=env, check=True, timeout=300)

    resumed = {f"shard-{int(k):05d}.npz" for k in log.read_text().split()[len(first_run):]}
    assert not resumed & finished, "finished shards were recomputed"
    assert resumed | finished == {f"shard-{k:05d}.npz" for k in range(n_shards)}
    assert {name: (out / SHARD_DIR / name).stat().st_mtime_ns for name in finished} == stamps
    s = load_attack_set(out)
    ids = [int(line.split(b'"id": ')[1].split(b",")[0]) for line in (out / MANIFEST_FILE).read_bytes().splitlines()]
    assert sorted(ids) == list(range(48)) and s.complete, "duplicates or holes in the manifest"
    generate_attack_set(*tiny_world(), tmp_path / "fresh", WORKER_PARAMS, progress=False)
    assert files(out) == files(tmp_path / "fresh")  # shards are written in order, so even the manifest matches


def test_generate_command_with_ray(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(subject_core, "world_subject", as_world_subject(tiny_world()))
    argv = ["attack", "generate", "--out", str(tmp_path / "set"), "--sources", "3", "--iterations", "4",
            "--batch-size", "9", "--ray", "--ray-actors", "2"]
    assert main(argv) == 0
    assert "(2 shards computed, 0 already done)" in capsys.readouterr().out
    assert load_attack_set(tmp_path / "set").complete and ray.is_initialized()  # the test's Ray was reused
    with pytest.raises(SystemExit, match="actors must be an integer >= 1, got -1"):
        main(argv[:-1] + ["-1"])


def test_quickstart_attack_stage_on_ray_equals_in_process(cluster, tmp_path):
    """`semguard quickstart --ray`: the world's attack set generated by Ray actors, the same files."""
    from types import SimpleNamespace

    from semguard.analysis.quickstart import QuickstartConfig, attack_stage

    model, images, labels, names, vectors = tiny_world()
    inputs = SimpleNamespace(model=model, word_vectors=vectors,
                             world=SimpleNamespace(test_images=images, test_labels=labels, classes=names))
    for ray_address, folder in ((None, "single"), (cluster, "ray")):
        attack_stage(inputs, tmp_path / folder, QuickstartConfig(tmp_path, attack=SMALL, progress=False, ray=ray_address))
    assert files(tmp_path / "ray") == files(tmp_path / "single")


def test_quickstart_ray_flag():
    from semguard.commands.quickstart import quickstart_config
    from semguard.cli import build_parser

    parse = lambda *argv: quickstart_config(build_parser().parse_args(["quickstart", "--out", "o", *argv]))  # noqa: E731
    assert parse().ray is None and parse("--ray").ray == "local" and parse("--ray", "auto").ray == "auto"
