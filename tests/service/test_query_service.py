"""`--query-defence` end to end: a real server on port 0, tritonclient (OIP v2) and the semguard.v1 API.

An attack-like stream (near-copies of one image) is flagged (annotate) or refused (block, ban); a
client retrying one image, or sending distinct images, is not; clients are told apart by an API key
header or their mTLS certificate, and one client's answers never reflect another's queries.
"""
from __future__ import annotations

import contextlib
import re
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from tritonclient.utils import InferenceServerException

from semguard.service.config import QueryDefenceConfig
from semguard.service.generated import guard_pb2 as pb
from semguard.service.generated import guard_pb2_grpc as pb_grpc
from tests.service.tls import _issue, write_certificates

KEY = "x-api-key"
# Each server draws a secret salt; these near copies match under most salts but not all (68 of 36 784 random
# salts broke the 4-query pattern below, which made a CI run fail), so the tests pin one that the
# fingerprint tests in test_query_defence.py use too.
SALT = 5


def pinned(created):
    """The server with its query defence's salt pinned (before any query: the index is still empty)."""
    assert created.server.engine.query.remembered() == 0
    created.server.engine.query.salt = SALT
    return created


def image(seed: int, size: int = 16) -> np.ndarray:
    """(1, 3, size, size) float32, dark enough for the test guard (mean pixel score) not to flag."""
    return np.random.default_rng(seed).uniform(0, 0.45, (1, 3, size, size)).astype(np.float32)


def near_copy(x: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0, 1 / 255, x.shape), 0, 1).astype(np.float32)


def infer(client: triton.InferenceServerClient, x: np.ndarray, who: str | None = None):
    inp = triton.InferInput("IMAGE", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("tinycnn", [inp], headers={KEY: who} if who else None)


def query_flags(client, images, who=None) -> list[bool | str]:
    """QUERY_FLAG per request, or "refused" where the server refused it."""
    out = []
    for x in images:
        try:
            out.append(bool(infer(client, x, who).as_numpy("QUERY_FLAG")[0]))
        except InferenceServerException as exc:
            assert "refused by the query defence" in str(exc) and exc.status() == "StatusCode.PERMISSION_DENIED"
            out.append("refused")
    return out


@pytest.fixture
def defended(make_server):
    """start(mode, **QueryDefenceConfig fields) -> (server, tritonclient); clients tell who they are by KEY."""
    clients = []

    def start(mode: str, **query):
        created = pinned(make_server(query=QueryDefenceConfig(mode=mode, window=12, **query), query_client_key=KEY))
        clients.append(triton.InferenceServerClient(f"127.0.0.1:{created.port}"))
        return created, clients[-1]
    yield start
    for c in clients:
        c.close()


def attack_stream(n: int = 6) -> list[np.ndarray]:
    base = image(1)
    return [base] + [near_copy(base, s) for s in range(1, n)]


def test_annotate_flags_an_attack_stream_and_not_a_retry_or_distinct_images(defended):
    created, client = defended("annotate", suspect_matches=3)
    assert query_flags(client, attack_stream(), "attacker") == [False, False, False, True, True, True]
    assert query_flags(client, [image(2)] * 6, "retrying") == [False] * 6
    assert query_flags(client, [image(s) for s in range(10, 16)], "browsing") == [False] * 6
    meta = client.get_model_metadata("tinycnn")
    assert meta.outputs[-1].name == "QUERY_FLAG"
    text = urllib.request.urlopen(f"http://127.0.0.1:{created.server.metrics_port}/metrics").read().decode()
    own = float(re.search(r'semguard_query_attack_matches_total\{scope="own"\} (\S+)', text).group(1))
    assert own == 5.0  # the attack's five near-copies; retries and distinct images are no matches
    assert re.search(r"^semguard_query_attack_suspected_clients 1\.0$", text, re.M)


def test_block_refuses_the_attack_once_suspected_and_serves_others(defended):
    created, client = defended("block", suspect_matches=3)
    assert query_flags(client, attack_stream(), "attacker") == [False, False, False, "refused", "refused", "refused"]
    assert query_flags(client, [image(7)], "attacker") == [False]  # block: a new image still passes
    assert query_flags(client, [image(2)] * 4, "retrying") == [False] * 4
    # another client sending the attacker's images learns nothing of the attacker's queries
    assert query_flags(client, attack_stream(3)[1:], "bystander") == [False, False]


def test_ban_refuses_every_query_of_a_suspected_client(defended):
    created, client = defended("ban", suspect_matches=2, ban_seconds=300)
    assert query_flags(client, attack_stream(4), "attacker") == [False, False, "refused", "refused"]
    assert query_flags(client, [image(7)], "attacker") == ["refused"]
    assert query_flags(client, [image(7)], "someone-else") == [False]
    text = urllib.request.urlopen(f"http://127.0.0.1:{created.server.metrics_port}/metrics").read().decode()
    assert "semguard_query_attack_bans_total 1.0" in text and "semguard_query_attack_refused_total 3.0" in text


def test_off_adds_no_output_and_keeps_no_state(make_server):
    created = make_server()
    client = triton.InferenceServerClient(f"127.0.0.1:{created.port}")
    try:
        result = infer(client, image(1))
        assert "QUERY_FLAG" not in [o.name for o in result.get_response().outputs]
        assert created.server.engine.query is None
    finally:
        client.close()


def test_the_guard_api_carries_the_query_verdict(make_server):
    created = pinned(make_server(query=QueryDefenceConfig(mode="annotate", window=12, suspect_matches=2)))
    with contextlib.closing(grpc.insecure_channel(f"127.0.0.1:{created.port}")) as channel:
        stub = pb_grpc.GuardStub(channel)
        assert stub.GetInfo(pb.GetInfoRequest()).query_defence == "annotate"
        verdicts = []
        for x in attack_stream(4):
            tensor = pb.Tensor(layout=pb.Tensor.FP32_NCHW, shape=list(x.shape), data=x.tobytes())
            verdicts.append(stub.Inspect(pb.InspectRequest(tensor=tensor)).verdicts[0].query)
    assert [v.matched for v in verdicts] == [False, True, True, True]
    assert [v.flagged for v in verdicts] == [False, False, True, True]
    assert verdicts[-1].client_matches == 3 and verdicts[-1].overlap >= QueryDefenceConfig().match_threshold


def test_mtls_clients_are_told_apart_by_certificate(make_server, tmp_path):
    paths = write_certificates(tmp_path)
    created = pinned(make_server(tls_cert=str(paths.server_cert), tls_key=str(paths.server_key),
                                 tls_client_ca=str(paths.ca_cert),
                                 query=QueryDefenceConfig(mode="block", window=12, suspect_matches=2)))

    def client(cert, key):
        return triton.InferenceServerClient(f"localhost:{created.port}", ssl=True, root_certificates=str(paths.ca_cert),
                                            private_key=str(key), certificate_chain=str(cert))
    first = client(paths.client_cert, paths.client_key)
    other_cert, other_key = _another_client(paths, tmp_path)
    second = client(other_cert, other_key)
    try:
        assert query_flags(first, attack_stream(4)) == [False, False, "refused", "refused"]
        # same address, another certificate: its own (empty) history
        assert query_flags(second, attack_stream(4)[1:3]) == [False, False]
    finally:
        first.close()
        second.close()


def _another_client(paths, directory):
    """(cert, key) paths of a second client certificate issued by the test CA."""
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue("second client", key, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    cert_path, key_path = directory / "second.crt", directory / "second.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_serve_flags_and_environment_fill_the_query_defence(capsys):
    from semguard.cli import build_parser
    from semguard.commands.serve import config_from_args, run_serve

    args = build_parser().parse_args(["serve", "--query-defence", "ban", "--query-client-key", KEY,
                                      "--query-match-threshold", "8", "--query-ban-seconds", "30"])
    config = config_from_args(args, environ={"SEMGUARD_QUERY_HISTORY": "500"})
    assert config.query == QueryDefenceConfig(mode="ban", match_threshold=8, ban_seconds=30.0, history=500)
    assert config.query_client_key == KEY
    bad = build_parser().parse_args(["serve", "--query-match-threshold", "13"])
    assert run_serve(bad) == 2
    assert "(--query-match-threshold)" in capsys.readouterr().err
