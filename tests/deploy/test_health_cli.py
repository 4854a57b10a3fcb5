"""`semguard health`: exit 0 and one line when SERVING, 1 otherwise; grpc only, never torch."""
from __future__ import annotations

import subprocess
import sys

import pytest

from semguard.cli import main
from tests.deploy.layout import ROOT


def run(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["health", *args])
    return code, capsys.readouterr().out.splitlines()


def test_serving_then_draining(make_server, capsys):
    created = make_server()
    address = f"127.0.0.1:{created.port}"
    assert run(capsys, "--address", address) == (0, [f"{address}: SERVING"])
    service = "inference.GRPCInferenceService"
    assert run(capsys, "--address", address, "--service", service) == (0, [f"{address} {service}: SERVING"])
    code, lines = run(capsys, "--address", address, "--service", "no.Such")
    assert code == 1 and len(lines) == 1 and "NOT_FOUND" in lines[0]
    created.server.health.enter_graceful_shutdown()  # what SIGTERM does first
    assert run(capsys, "--address", address) == (1, [f"{address}: NOT_SERVING"])


def test_unreachable_is_one_line_and_exit_1(capsys):
    code, lines = run(capsys, "--address", "127.0.0.1:1", "--timeout", "1")
    assert code == 1 and len(lines) == 1 and "UNAVAILABLE" in lines[0]


def test_bad_timeout_is_exit_2(capsys):
    assert main(["health", "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err


def test_imports_grpc_but_not_torch():
    """`python -X importtime`: the probe a container runs every 15 s must not load torch (seconds of CPU)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "semguard.cli", "health",
                             "--address", "127.0.0.1:1", "--timeout", "0.5"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and len(result.stdout.splitlines()) == 1, result.stdout + result.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"grpc", "grpc_health"} <= imported
    heavy = imported & {"torch", "numpy", "torchvision", "PIL", "tritonclient", "prometheus_client"}
    assert not heavy, f"semguard health imported {sorted(heavy)}"


@pytest.mark.parametrize("argv", [["--help"]])
def test_listed_in_the_full_command_line(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert "health" in capsys.readouterr().out
