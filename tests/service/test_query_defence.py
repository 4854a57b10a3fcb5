"""service/query_defence.py without gRPC: fingerprints, matching, suspicion, block/ban, bounds, identities."""
from __future__ import annotations

import numpy as np
import pytest

from semguard.service.config import QueryDefenceConfig
from semguard.service.query_defence import (QueryDefence, _splitmix64, client_identity, fingerprints, hash_base,
                                            window_hashes)

SHAPE = (1, 3, 32, 32)


def smooth_image(seed: int) -> np.ndarray:
    """(1, 3, 32, 32) float32: a random low-frequency image (natural images are smooth, unlike noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (1, 3, 4, 4))
    return np.clip(np.kron(coarse, np.ones((8, 8))) + rng.normal(0, 0.02, SHAPE), 0, 1).astype(np.float32)


def near_copy(image: np.ndarray, seed: int, sigma: float = 1 / 255) -> np.ndarray:
    """image plus small Gaussian noise: one query of a query attack."""
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 1).astype(np.float32)


def reference_hashes(image: np.ndarray, window: int, step: int, salt: int) -> list[int]:
    """Window hashes by the definition, with Python ints: sum_t q_{i+t} P^-t mod 2**64, then mixed."""
    p_inv = pow(hash_base(salt), -1, 2**64)
    q = [int(v) // step + 1 for v in np.clip(np.rint(image.reshape(-1) * 255), 0, 255).astype(int)]
    out = []
    for i in range(len(q) - window + 1):
        h = sum(q[i + t] * pow(p_inv, t, 2**64) for t in range(window)) % 2**64
        out.append(int(_splitmix64(np.array([h], dtype=np.uint64))[0]))
    return out


def test_window_hashes_match_the_definition_and_ignore_position():
    image = np.random.default_rng(0).uniform(0, 1, (1, 3, 4, 4)).astype(np.float32)
    got = window_hashes(image, 5, 50, salt=7)
    assert got.shape == (1, 48 - 5 + 1)
    assert got[0].tolist() == reference_hashes(image[0], 5, 50, 7)
    shifted = np.zeros((1, 3, 4, 6), np.float32)  # the same 48 values, two more in front
    shifted.reshape(-1)[2:50] = image.reshape(-1)
    assert window_hashes(shifted, 5, 50, 7)[0, 2:2 + got.shape[1]].tolist() == got[0].tolist()


def test_the_salt_changes_every_hash():
    image = smooth_image(1)
    a, b = window_hashes(image, 20, 50, 1), window_hashes(image, 20, 50, 2)
    assert not np.intersect1d(a, b).size


def test_near_copies_share_most_hashes_and_distinct_images_none():
    config = QueryDefenceConfig()
    base = fingerprints(smooth_image(1), config, 3)[0][-config.n_hashes:]  # what is remembered
    assert len(base) == config.n_hashes
    copies = [np.intersect1d(base, fingerprints(near_copy(smooth_image(1), s), config, 3)[0]).size for s in range(5)]
    others = [np.intersect1d(base, fingerprints(smooth_image(s), config, 3)[0]).size for s in range(2, 7)]
    assert min(copies) >= config.match_threshold > max(others)


def test_an_attack_stream_is_suspected_then_blocked_and_a_retry_is_not():
    defence = QueryDefence(QueryDefenceConfig(mode="block", suspect_matches=3), salt=5)
    image = smooth_image(1)
    retries = [defence.check(image, "benign") for _ in range(10)]
    assert not any(c.refused or c.verdicts[0].matched or c.verdicts[0].suspected for c in retries)
    checks = [defence.check(near_copy(image, s), "attacker") for s in range(10)]
    matched = [c.verdicts[0].matched for c in checks]
    assert not matched[0] and all(matched[1:])  # the first has nothing of its own to match
    assert [c.verdicts[0].client_matches for c in checks[:5]] == [0, 1, 2, 3, 4]
    assert [c.refused for c in checks[:5]] == [False, False, False, True, True]
    assert checks[3].newly_suspected and not checks[4].newly_suspected and defence.n_suspected == 1
    assert not defence.check(smooth_image(9), "attacker").refused  # block refuses near-duplicates only


def test_ban_refuses_every_query_until_it_expires():
    now = [0.0]
    defence = QueryDefence(QueryDefenceConfig(mode="ban", suspect_matches=2, ban_seconds=60), salt=5,
                           clock=lambda: now[0])
    image = smooth_image(1)
    checks = [defence.check(near_copy(image, s), "attacker") for s in range(3)]
    assert [c.refused for c in checks] == [False, False, True] and checks[2].newly_banned
    assert defence.check(smooth_image(9), "attacker").refused  # banned: even a new image
    assert not defence.check(smooth_image(9), "someone else").refused
    now[0] = 61.0
    assert not defence.check(smooth_image(10), "attacker").refused


def test_answers_count_only_the_clients_own_queries():
    """B sends near-copies of A's queries: the operator sees cross-client matches, B's answers do not."""
    defence = QueryDefence(QueryDefenceConfig(mode="block", suspect_matches=2), salt=5)
    image = smooth_image(1)
    for s in range(5):
        defence.check(near_copy(image, s), "a")
    check = defence.check(near_copy(image, 99), "b")
    assert check.cross_client == 1
    assert check.verdicts[0] == (False, 0, 0, False) and not check.refused


def test_memory_is_bounded_by_the_history_and_old_queries_are_forgotten():
    config = QueryDefenceConfig(mode="annotate", history=8)
    defence = QueryDefence(config, salt=5)
    nbytes = defence.index.nbytes
    first = smooth_image(0)
    defence.check(first, "a")
    assert defence.check(near_copy(first, 1), "a").verdicts[0].matched
    for s in range(1, 30):
        defence.check(smooth_image(s), "a")
    assert defence.remembered() == 8 and defence.index.nbytes == nbytes
    assert not defence.check(near_copy(first, 1), "a").verdicts[0].matched  # evicted


def test_clients_beyond_max_clients_are_forgotten_least_recent_first():
    defence = QueryDefence(QueryDefenceConfig(mode="annotate", max_clients=3), salt=5)
    for name in "abcd":
        defence.check(smooth_image(ord(name)), name)
    assert len(defence._clients) == 3


def test_a_batch_gets_one_verdict_per_image():
    defence = QueryDefence(QueryDefenceConfig(mode="annotate"), salt=5)
    image = smooth_image(1)
    batch = np.concatenate([image, near_copy(image, 1), smooth_image(2)])
    assert [v.matched for v in defence.check(batch, "a").verdicts] == [False, True, False]


def test_client_identity_prefers_the_key_then_the_certificate_then_the_peer_host():
    meta = [("user-agent", "grpc"), ("x-api-key", "k1")]
    assert client_identity("ipv4:10.0.0.1:5000", meta, [b"client"], "x-api-key") == "key:k1"
    assert client_identity("ipv4:10.0.0.1:5000", meta, [b"client"], "x-other") == "cert:client"
    assert client_identity("ipv4:10.0.0.1:5000", meta, None, None) == "peer:ipv4:10.0.0.1"
    assert client_identity("ipv4:10.0.0.1:5001", (), None, None) == "peer:ipv4:10.0.0.1"
    assert client_identity("ipv6:[::1]:5000", (), None, None) == "peer:ipv6:[::1]"


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "spy"}, "query.mode must be one of"),
    ({"match_threshold": 60}, "query.match_threshold"),
    ({"probe_hashes": 8}, "query.probe_hashes"),
    ({"suspect_matches": 200}, "query.suspect_matches"),
    ({"history": 0}, "query.history must be >= 1"),
    ({"ban_seconds": 0}, "query.ban_seconds"),
])
def test_bad_config_is_rejected_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QueryDefenceConfig(**kwargs)


def test_images_smaller_than_the_window_are_an_error():
    with pytest.raises(ValueError, match="fewer than the hash window"):
        window_hashes(np.zeros((1, 1, 2, 2), np.float32), 20, 50, 0)
