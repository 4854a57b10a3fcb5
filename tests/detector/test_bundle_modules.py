"""Which code a bundle.json can make semguard import: semguard.* only; pre-namespace names still load."""
import json
import subprocess
import sys
import textwrap

import pytest

from semguard.detector.bundle import BundleError
from semguard.models.factory import ModelSpec, ModelSpecError, create_model, plugin_module
from tests.tiny_worldnet import write_worldnet_bundle


@pytest.fixture(scope="module")
def worldnet_bundle(tmp_path_factory):
    return write_worldnet_bundle(tmp_path_factory.mktemp("bundle"))


def _set_module(bundle_dir, module: str) -> None:
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest["model"]["module"] = module
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))


def _load_in_fresh_process(bundle_dir, extra_path: str = "") -> subprocess.CompletedProcess:
    """A new interpreter, where no builder but the built-ins is registered yet."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {extra_path!r})
        from semguard.detector.guard import Guard
        guard = Guard.load({str(bundle_dir)!r})
        import torch
        verdicts = guard.inspect(torch.rand(2, 3, 16, 16))
        print("loaded", len(verdicts), "models" in sys.modules)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_bundle_written_before_the_move_loads_and_serves(worldnet_bundle):
    _set_module(worldnet_bundle, "models.worldnet")  # as every bundle.json written before semguard.* named it
    done = _load_in_fresh_process(worldnet_bundle)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["loaded", "2", "False"]  # served, and no top-level `models` was imported


def test_bundle_naming_a_module_outside_semguard_is_refused_unimported(worldnet_bundle, tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "hostile_plugin.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    _set_module(worldnet_bundle, "hostile_plugin")
    try:
        done = _load_in_fresh_process(worldnet_bundle, str(tmp_path))
    finally:
        _set_module(worldnet_bundle, "semguard.models.worldnet")
    assert done.returncode != 0
    assert "BundleError" in done.stderr and "'hostile_plugin' is outside the 'semguard' package" in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("module, message", [
    ("os", "outside the 'semguard' package"),
    ("semguardx.models", "outside the 'semguard' package"),
    ("models.no_such_module", "no module 'semguard.models.no_such_module'"),
    ("semguard.models.worldnet; import os", "dotted module name"),
    ("", "dotted module name"),
])
def test_plugin_module_refusals_name_the_module(module, message):
    with pytest.raises(ModelSpecError, match=message):
        create_model(ModelSpec("no_such_builder_here", {}, module=module))


def test_plugin_module_maps_every_pre_namespace_package():
    for old in ("detector", "attacks", "service", "world", "models", "analysis"):
        assert plugin_module(f"{old}.x") == f"semguard.{old}.x"
    assert plugin_module("semguard.models.worldnet") == "semguard.models.worldnet"
