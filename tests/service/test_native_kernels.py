"""`semguard serve --native-kernels`: the flag and its environment variable reach the config, the guard
is built with the one-pass kernel, and a machine without a C compiler gets exit code 2 and one line."""
from __future__ import annotations

import pytest

from semguard.cli import build_parser
from semguard.commands.serve import config_from_args
from semguard.detector import native
from semguard.service.errors import StartupError
from semguard.service.server import load_guard
from tests.detector.test_native import kernels_or_skip
from tests.tiny_worldnet import IMAGE_SIZE, write_worldnet_bundle


def test_the_flag_and_its_variable_reach_the_config():
    parse = build_parser().parse_args
    assert config_from_args(parse(["serve"]), environ={}).native_kernels is False
    assert config_from_args(parse(["serve", "--native-kernels"]), environ={}).native_kernels is True
    assert config_from_args(parse(["serve"]), environ={"SEMGUARD_NATIVE_KERNELS": "1"}).native_kernels is True


def test_load_guard_builds_the_kernel(tmp_path):
    kernels_or_skip()
    import torch

    guard = load_guard(write_worldnet_bundle(tmp_path), native_kernels=True)
    assert guard.recipe.kernels is not None
    assert len(guard.inspect(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))) == 2


def test_no_compiler_is_a_startup_error(tmp_path, monkeypatch):
    bundle = write_worldnet_bundle(tmp_path)
    monkeypatch.setenv("CC", "semguard-no-such-cc")
    native.load_kernels.cache_clear()
    try:
        with pytest.raises(StartupError, match=r"^--native-kernels: no C compiler: 'semguard-no-such-cc'") as refused:
            load_guard(bundle, native_kernels=True)
        assert refused.value.exit_code == 2
        assert load_guard(bundle).recipe.kernels is None  # without the flag no compiler is needed
    finally:
        native.load_kernels.cache_clear()
