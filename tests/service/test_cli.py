"""`semguard serve` flags and SEMGUARD_* environment -> ServiceConfig."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import tritonclient.grpc as triton

from semguard.cli import build_parser
from semguard.commands.serve import config_from_args
from semguard.service.config import ServiceConfig
from tests.service.fake_upstream import FakeUpstream, raw_answer
from tests.tiny_worldnet import write_worldnet_bundle


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


def serve_fails(*flags: str, bundle: str | None = None) -> tuple[int, str]:
    """`python -m semguard.cli serve ...` expected to exit at once: (exit code, stderr)."""
    cmd = [sys.executable, "-m", "semguard.cli", "serve", "--bundle", bundle or ".", "--host", "127.0.0.1",
           "--metrics-port", "0", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("flags, code, names", [
    (["--max-batch-size", "0"], 2, "--max-batch-size"),
    (["--max-batch-size", "x"], 2, "--max-batch-size"),
    (["--policy", "block", "--block-action", "refuse", "--upstream", "127.0.0.1:1"], 2, "--block-action"),
    (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], 1, "--tls-key /nonexistent"),
    (["--tls-cert", "c.pem"], 2, "--tls-cert"),
    (["--bundle", "/nonexistent/bundle"], 2, "--bundle /nonexistent/bundle"),
])
def test_configuration_errors_are_one_line(flags, code, names):
    rc, err = serve_fails(*flags)
    assert rc == code and len(err.strip().splitlines()) == 1 and names in err, err


def test_port_in_use_is_one_line(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        rc, err = serve_fails("--grpc-port", str(taken.getsockname()[1]), bundle=str(tmp_path))
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "--grpc-port" in err, err


def serving_port_in(log: list[str]) -> int:
    match = re.search(r"semguard serving .* on 127\.0\.0\.1:(\d+)", log[-1]) if log else None
    assert match, "server did not start:\n" + "".join(log)
    return int(match.group(1))


@pytest.mark.slow
def test_an_upstream_clash_never_stops_serve(tmp_path):
    """`semguard serve` in front of an upstream whose outputs clash: it serves, not ready, says why once."""
    up = FakeUpstream(["SCORE", "FLAG"], raw_answer({}))
    up.start()
    bundle = write_worldnet_bundle(tmp_path)
    cmd = [sys.executable, "-m", "semguard.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
           "--grpc-port", "0", "--metrics-port", "0", "--torch-threads", "1", "--grace-seconds", "1",
           "--upstream", f"127.0.0.1:{up.port}", "--upstream-model", "clf", "--upstream-poll-seconds", "0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []  # the first poll (and its error) comes before the "serving" line
    try:
        while not (log and "semguard serving" in log[-1]) and (line := proc.stderr.readline()):
            log.append(line)
        port = serving_port_in(log)
        time.sleep(0.5)  # five polls
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert proc.poll() is None and not client.is_server_ready()
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
        up.stop()
    err = "".join(log) + rest
    assert proc.returncode == 0, err
    clashes = [line for line in err.splitlines() if "FLAG, SCORE named like the guard's" in line]
    assert len(clashes) == 1 and "--output-prefix" in clashes[0] and "Traceback" not in err, err
