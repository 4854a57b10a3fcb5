"""`semguard serve` flags and SEMGUARD_* environment -> ServiceConfig."""
from __future__ import annotations

import pytest

from semguard.cli import build_parser
from semguard.service.cli import config_from_args
from semguard.service.config import ServiceConfig


def test_flags_then_env_then_defaults():
    args = build_parser().parse_args(["serve", "--bundle", "b", "--grpc-port", "9001", "--policy", "block"])
    assert args.func.__name__ == "run_serve" and args.bundle == "b"
    config = config_from_args(args, environ={"SEMGUARD_GRPC_PORT": "1", "SEMGUARD_MAX_BATCH_SIZE": "4"})
    assert (config.grpc_port, config.policy, config.max_batch_size) == (9001, "block", 4)
    assert config.max_message_bytes == ServiceConfig().max_message_bytes
    no_metrics = config_from_args(build_parser().parse_args(["serve", "--no-metrics"]), environ={})
    assert no_metrics.metrics_port is None


def test_bad_values_name_the_setting(capsys):
    with pytest.raises(SystemExit):  # a flag is checked by argparse, against POLICIES
        build_parser().parse_args(["serve", "--policy", "maybe"])
    assert "invalid choice: 'maybe' (choose from 'annotate', 'block')" in capsys.readouterr().err
    with pytest.raises(ValueError, match="policy must be one of"):  # the environment by ServiceConfig
        config_from_args(build_parser().parse_args(["serve"]), environ={"SEMGUARD_POLICY": "maybe"})
    with pytest.raises(ValueError, match="SEMGUARD_GRPC_PORT must be a int"):
        config_from_args(build_parser().parse_args(["serve"]), environ={"SEMGUARD_GRPC_PORT": "x"})
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        ServiceConfig(tls_cert="a.pem")
