"""--upstream-tls: the guard -> upstream hop over TLS, with a client certificate (mTLS) for an
upstream that requires one; without the right credentials the upstream is never reached."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from semguard.cli import build_parser
from semguard.service import server as server_module
from semguard.commands.serve import config_from_args
from tests.service.fake_upstream import FakeUpstream, raw_answer
from tests.service.test_server import triton_infer
from tests.service.test_upstream import _health, _wait_for
from tests.service.tls import write_certificates


@pytest.fixture
def mtls_upstream(tmp_path, clean_images):
    """An upstream that speaks TLS only and requires a client certificate signed by the test CA."""
    certs = write_certificates(tmp_path)
    credentials = grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
        root_certificates=certs.ca_cert.read_bytes(), require_client_auth=True)
    up = FakeUpstream(["OUT"], raw_answer({"OUT": ("FP32", np.arange(len(clean_images), dtype="<f4"))}))
    up.start(credentials=credentials)
    yield up, certs
    up.stop()


def test_mtls_upstream_is_reached_with_the_client_certificate(make_server, mtls_upstream, clean_images):
    up, certs = mtls_upstream
    front = make_server(upstream=f"localhost:{up.port}", upstream_model="clf", upstream_tls=True,
                        upstream_tls_ca=str(certs.ca_cert), upstream_tls_cert=str(certs.client_cert),
                        upstream_tls_key=str(certs.client_key), upstream_poll_seconds=0.1)
    assert _wait_for(lambda: _health(front.port) == health_pb2.HealthCheckResponse.SERVING)
    res = triton_infer(front.port, "IMAGE", clean_images, "FP32", model="clf")  # the upstream's name (drop-in)
    np.testing.assert_array_equal(res.as_numpy("OUT"), np.arange(len(clean_images), dtype=np.float32))
    assert len(up.requests) == 1


@pytest.mark.parametrize("tls", [
    {},  # plaintext: what every guard did before --upstream-tls
    {"upstream_tls": True, "upstream_tls_ca": "ca"},  # TLS without the client certificate the upstream requires
])
def test_without_the_right_credentials_the_upstream_is_never_reached(make_server, mtls_upstream, tls):
    up, certs = mtls_upstream
    if "upstream_tls_ca" in tls:
        tls = {**tls, "upstream_tls_ca": str(certs.ca_cert)}
    front = make_server(upstream=f"localhost:{up.port}", upstream_model="clf", upstream_poll_seconds=0.1, **tls)
    assert not _wait_for(lambda: _health(front.port) == health_pb2.HealthCheckResponse.SERVING, timeout=1.5)
    assert up.requests == []


def test_upstream_tls_flags():
    parse = build_parser().parse_args
    config = config_from_args(parse(["serve", "--upstream", "u:1", "--upstream-tls", "--upstream-tls-ca", "ca.pem",
                                     "--upstream-tls-cert", "c.pem", "--upstream-tls-key", "k.pem"]), environ={})
    assert (config.upstream_tls, config.upstream_tls_ca, config.upstream_tls_cert, config.upstream_tls_key) == (
        True, "ca.pem", "c.pem", "k.pem")
    assert config_from_args(parse(["serve", "--upstream", "u:1"]), environ={"SEMGUARD_UPSTREAM_TLS": "1"}).upstream_tls
    for flags, message in [(["--upstream", "u:1", "--upstream-tls", "--upstream-tls-cert", "c.pem"], "together"),
                           (["--upstream", "u:1", "--upstream-tls-ca", "ca.pem"], "need upstream_tls"),
                           (["--upstream-tls"], "upstream_tls needs upstream")]:
        with pytest.raises(ValueError, match=message):
            config_from_args(parse(["serve", *flags]), environ={})


def test_an_unreadable_client_key_is_a_startup_error(make_server, tmp_path):
    with pytest.raises(server_module.StartupError, match=r"--upstream-tls-key .*missing.key: cannot read"):
        make_server(upstream="localhost:1", upstream_tls=True, upstream_tls_cert=str(tmp_path / "c.pem"),
                    upstream_tls_key=str(tmp_path / "missing.key"))
