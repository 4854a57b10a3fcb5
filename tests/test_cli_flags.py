"""The `semguard` flags derived from the config dataclasses (semguard.config_flags), and the one world cache."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from semguard.commands.quickstart import QUICKSTART_FLAGS, quickstart_config
from semguard.commands.detector import _config as detector_config
from semguard.commands.detector import detector_flags
from semguard.commands.train import TRAIN_FLAGS, train_config
from semguard.commands.attack import generate_flags, params_from_args
from semguard.commands.serve import FLAGS as SERVE_FLAGS
from semguard.commands.serve import config_from_args as serve_config

from semguard.cli import build_parser
from semguard.config_flags import (
    DeferredParser,
    Flag,
    add_config_flags,
    comma_list,
    config_from_flags,
    defer_arguments,
    field_spec,
    value_parser,
)
from semguard.world_cache import DEFAULT_WORLD_CACHE

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class Group(NamedTuple):
    argv: list[str]  # the command and its required flags
    flags: tuple[Flag, ...]
    config: Callable[[argparse.Namespace], Any]  # parsed args -> the command's config
    default: Callable[[], Any]  # the config when no flag is given


def _quickstart_default():
    from semguard.analysis.quickstart import QuickstartConfig

    return QuickstartConfig(out=Path("o"))


def _detector_default():
    from semguard.evaluation.detector_eval import DetectorEvalConfig

    return DetectorEvalConfig()


def _generate_default():
    from semguard.attacks.generate import GenerateParams

    return GenerateParams()


def _train_default():
    from semguard.models.trainer import TrainConfig

    return TrainConfig()


def _serve_default():
    from semguard.service.config import ServiceConfig

    return ServiceConfig()


GROUPS = {
    "quickstart": Group(["quickstart", "--out", "o"], QUICKSTART_FLAGS, quickstart_config, _quickstart_default),
    "detector": Group(["detector", "calibrate", "--out", "o"], detector_flags(), detector_config, _detector_default),
    "attack": Group(["attack", "generate", "--out", "o"], generate_flags(), params_from_args, _generate_default),
    "serve": Group(["serve"], SERVE_FLAGS, lambda args: serve_config(args, environ={}), _serve_default),
    "train": Group(["train", "--out", "o"], TRAIN_FLAGS, train_config, _train_default),
}
# Fields a flag may only be given with (ServiceConfig checks them together), and fields one flag sets besides its own.
COMPANIONS = {"--tls-cert": ["--tls-key", "k.pem"], "--tls-key": ["--tls-cert", "c.pem"],
              "--tls-client-ca": ["--tls-cert", "c.pem", "--tls-key", "k.pem"], "--upstream-model": ["--upstream", "u:1"],
              "--upstream-tls": ["--upstream", "u:1"], "--upstream-tls-ca": ["--upstream", "u:1", "--upstream-tls"],
              "--upstream-tls-cert": ["--upstream", "u:1", "--upstream-tls", "--upstream-tls-key", "k.pem"],
              "--upstream-tls-key": ["--upstream", "u:1", "--upstream-tls", "--upstream-tls-cert", "c.pem"]}
ALSO_SET = {"--tls-cert": {"tls_key"}, "--tls-key": {"tls_cert"}, "--tls-client-ca": {"tls_cert", "tls_key"},
            "--upstream-model": {"upstream"}, "--upstream-tls": {"upstream"},
            "--upstream-tls-ca": {"upstream", "upstream_tls"},
            "--upstream-tls-cert": {"upstream", "upstream_tls", "upstream_tls_key"},
            "--upstream-tls-key": {"upstream", "upstream_tls", "upstream_tls_cert"},
            ("detector", "--seed"): {"detector.seed"}}  # one seed: the clean split and the calibration


def flat(config: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted field path: value} through nested config dataclasses."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def other_value(flag: Flag, hint: Any, default: Any) -> tuple[list[str], Any]:
    """(flag argv, the value it should put into the field): something other than the default."""
    if hint is bool:
        return [flag.name], not default
    if flag.choices:
        choice = next(c for c in flag.choices if c != default)
        return [flag.name, choice], choice
    if default is None:
        return [flag.name, "3"], value_parser(hint)("3")
    if isinstance(default, tuple):
        return [flag.name, default[0]], default[:1]
    if isinstance(default, float):
        return [flag.name, str(default / 2)], default / 2
    if isinstance(default, int):
        return [flag.name, str(default // 2 or 3)], default // 2 or 3
    return [flag.name, "x"], "x"


def group_flags():
    for name, group in GROUPS.items():
        for flag in group.flags:
            yield pytest.param(name, flag, id=f"{name}{flag.name}")


@pytest.mark.parametrize("name", list(GROUPS))
def test_no_flags_give_the_dataclass_default(name):
    group = GROUPS[name]
    assert group.config(build_parser().parse_args(group.argv)) == group.default()


@pytest.mark.parametrize("name, flag", group_flags())
def test_a_flag_overrides_exactly_its_field(name, flag):
    group = GROUPS[name]
    default = group.default()
    argv, value = other_value(flag, *field_spec(type(default), flag.field))
    config = group.config(build_parser().parse_args(group.argv + argv + COMPANIONS.get(flag.name, [])))
    before, after = flat(default), flat(config)
    assert after[flag.field] == value
    changed = {path for path in after if after[path] != before[path]}
    assert changed == {flag.field} | ALSO_SET.get(flag.name, set()) | ALSO_SET.get((name, flag.name), set())


@pytest.mark.parametrize("name, flag", [p for p in group_flags() if p.values[1].choices])
def test_an_invalid_choice_is_rejected_naming_the_allowed_values(name, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(GROUPS[name].argv + [flag.name, "bogus"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert f"argument {flag.name}: invalid choice: 'bogus'" in message
    assert all(repr(choice) in message for choice in flag.choices)


def test_choices_are_the_constants_the_configs_validate_with():
    from semguard.attacks.mifgsm import BACKENDS
    from semguard.detector.flagger import METHODS
    from semguard.detector.reference import SPACES
    from semguard.service.config import BLOCK_ACTIONS, POLICIES

    choices = {f.name: f.choices for group in GROUPS.values() for f in group.flags if f.choices}
    assert choices["--policy"] == POLICIES and choices["--block-action"] == BLOCK_ACTIONS
    assert choices["--method"] == METHODS and choices["--space"] == SPACES and choices["--backend"] == BACKENDS
    assert set(choices["--bank-reduction"]) == {"sketch", "projection", "channel_pool"}
    assert choices["--attack"] == ("mifgsm", "pgd")


def test_serve_environment_fallback_and_flag_precedence():
    args = build_parser().parse_args(["serve", "--max-queue-delay-ms", "1.5"])
    config = serve_config(args, environ={"SEMGUARD_MAX_QUEUE_DELAY_MS": "9", "SEMGUARD_POLICY": "block",
                                         "SEMGUARD_TORCH_THREADS": "2"})
    assert (config.max_queue_delay_ms, config.policy, config.torch_threads) == (1.5, "block", 2)
    with pytest.raises(ValueError, match="policy must be one of"):  # the environment is checked by ServiceConfig
        serve_config(build_parser().parse_args(["serve"]), environ={"SEMGUARD_POLICY": "maybe"})


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield path, getattr(parser, "complete", lambda: parser)()
        return
    for name, sub in subcommands[0].choices.items():
        yield from leaf_parsers(sub, path + (name,))


def test_every_command_that_reads_a_world_has_the_same_world_cache_flag():
    from semguard.analysis.quickstart import QuickstartConfig
    from semguard.world.inputs import DEFAULT_CACHE_DIR

    leaves = dict(leaf_parsers(build_parser()))
    assert set(leaves) == {("quickstart",), ("serve",), ("health",), ("attack", "generate"), ("attack", "analyze"),
                           ("attack", "query"), ("detector", "calibrate"), ("detector", "evaluate"), ("world", "build"), ("train",),
                           ("analyze", "training"), ("analyze", "diagram"), ("analyze", "two-vs-two"),
                           ("reproduce",), ("world", "export")}
    for path, parser in leaves.items():
        if path in {("serve",), ("health",), ("analyze", "diagram")}:  # a bundle / a server / an architecture, not a world
            continue
        flag = next(a for a in parser._actions if "--world-cache" in a.option_strings)
        assert (flag.dest, flag.default) == ("world_cache", DEFAULT_WORLD_CACHE), path
    assert DEFAULT_CACHE_DIR == DEFAULT_WORLD_CACHE == QuickstartConfig.__dataclass_fields__["cache_dir"].default
    old_name = build_parser().parse_args(["detector", "evaluate", "--out", "o", "--cache-dir", "w"])
    assert old_name.world_cache == Path("w")  # the detector commands' former spelling still works


SUBJECT_COMMANDS = {("attack", "generate"), ("attack", "analyze"), ("detector", "calibrate"), ("detector", "evaluate"),
                    ("analyze", "two-vs-two"), ("analyze", "training")}


def test_every_batch_command_takes_the_same_subject_flags():
    from semguard.subject.flags import FLAG_KEYS

    leaves = dict(leaf_parsers(build_parser()))
    expected = {"--subject", "--trust-pickled-vectors", *("--" + k.replace("_", "-") for k in FLAG_KEYS)}
    assert {"--model", "--weights", "--model-entry", "--images", "--labels", "--vectors"} <= expected  # the names
    for path in SUBJECT_COMMANDS:
        options = {o for a in leaves[path]._actions for o in a.option_strings}
        assert expected <= options, (path, sorted(expected - options))


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["bench_guard", "detector_design", "fast_mode_agreement"])
def test_benchmarks_that_read_a_world_take_the_same_world_cache_flag(name):
    assert _load_benchmark(name).build_parser().parse_args([]).world_cache == DEFAULT_WORLD_CACHE


def test_no_benchmark_keeps_another_world_cache():
    for source in BENCHMARKS.glob("*.py"):
        text = source.read_text()
        assert "--cache-dir" not in text and ".cache/semguard" not in text, source.name


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int | None = None
    kinds: tuple[str, ...] = ("a", "b")


@dataclasses.dataclass(frozen=True)
class Outer:
    out: Path
    inner: Inner = Inner(width=4)
    mode: str = "fast"
    verbose: bool = False


def test_field_spec_types_defaults_and_errors():
    assert field_spec(Outer, "inner.width") == (int | None, 4)  # the nested config's value, not Inner's default
    assert field_spec(Outer, "inner.kinds") == (tuple[str, ...], ("a", "b"))
    with pytest.raises(ValueError, match=r"Inner has no field 'depth'; fields: \['kinds', 'width'\]"):
        field_spec(Outer, "inner.depth")
    with pytest.raises(TypeError, match="'out' of Outer has no default"):
        field_spec(Outer, "out")
    assert value_parser(int | None) is int and value_parser(tuple[str, ...]) is comma_list
    with pytest.raises(TypeError, match="no flag parser"):
        value_parser(dict[str, int])


def test_config_from_flags_on_a_plain_parser():
    flags = (Flag("--width", "inner.width", "layer width"), Flag("--kinds", "inner.kinds"),
             Flag("--mode", "mode", choices=("fast", "exact")), Flag("--verbose", "verbose"))
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Outer, flags)
    base = Outer(out=Path("o"))
    assert config_from_flags(parser.parse_args([]), base, flags) == base
    given = config_from_flags(parser.parse_args(["--width", "8", "--kinds", "c,d", "--verbose"]), base, flags)
    assert given == Outer(out=Path("o"), inner=Inner(width=8, kinds=("c", "d")), verbose=True)
    assert "layer width (default: 4)" in " ".join(parser.format_help().split())
    with pytest.raises(ValueError, match=r"--mode's default 'fast' is not among \('exact',\)"):
        add_config_flags(argparse.ArgumentParser(), Outer, (Flag("--mode", "mode", choices=("exact",)),))


def test_deferred_arguments_are_added_on_first_use():
    added: list[str] = []

    def add(parser: argparse.ArgumentParser) -> None:
        added.append("x")
        parser.add_argument("--x", type=int, default=1)

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", parser_class=DeferredParser)
    defer_arguments(commands.add_parser("run"), add)
    assert added == [] and parser.parse_args(["run", "--x", "2"]).x == 2 and added == ["x"]
    plain = argparse.ArgumentParser()
    defer_arguments(plain, add)  # not a DeferredParser: added at once
    assert added == ["x", "x"]
