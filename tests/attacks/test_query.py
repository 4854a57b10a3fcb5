"""attacks/query.py without a server: the plan, the attacker's oracle (budget, refusals, best image), params."""
from __future__ import annotations

import numpy as np
import pytest

from semguard.attacks.query import Answer, QueryAttackParams, _Oracle, _Stop, blind, distortion, plan_query_attack


class FakeEndpoint:
    """Answers class 1 for images brighter than 0.5 on average, else class 0; refuses what `refuse` says."""

    n_classes = 3

    def __init__(self, refuse=lambda x: False, flag=lambda x: False):
        self.refuse, self.flag, self.sent = refuse, flag, []

    def ask(self, image, client_id=None, scores=False):
        self.sent.append(client_id)
        if self.refuse(image):
            return Answer(-1, None, False, False, True)
        pred = int(image.mean() > 0.5)
        probs = np.eye(3, dtype=np.float32)[pred] if scores else None
        return Answer(pred, probs, self.flag(image), False, False)


def oracle(endpoint, **params) -> _Oracle:
    source = np.full((3, 4, 4), 0.4, np.float32)
    return _Oracle(endpoint, QueryAttackParams(**params), source, 0, None, np.random.default_rng(0))


def test_the_oracle_keeps_the_least_distorted_adversarial_answer_and_stops_at_success():
    o = oracle(FakeEndpoint(), max_queries=10, eps=0.5)
    far, near = np.full((1, 3, 4, 4), 0.9, np.float32), np.full((1, 3, 4, 4), 0.55, np.float32)
    assert o(far).tolist() == [[0, 1, 0]] and o.queries_to_success is None  # adversarial, L2 ~2.0 > eps
    o(near)  # L2 0.15 * sqrt(48) ~ 1.04 > 0.5: still not within eps
    assert o.best_distortion == pytest.approx(distortion(near[0], o.source, "l2"))
    o2 = oracle(FakeEndpoint(), max_queries=10, eps=1.1)
    o2(near)
    assert o2.queries_to_success == 1
    with pytest.raises(_Stop):
        o2(near)


def test_the_budget_stops_the_attack():
    o = oracle(FakeEndpoint(), max_queries=3)
    with pytest.raises(_Stop):
        o(np.zeros((5, 3, 4, 4), np.float32))
    assert o.queries == 3


def test_refused_and_flagged_answers_read_as_the_source_class():
    bright = np.full((2, 3, 4, 4), 0.9, np.float32)
    refused = oracle(FakeEndpoint(refuse=lambda x: True))
    assert refused(bright).tolist() == [[1, 0, 0]] * 2 and refused.refused == 2 and refused.best is None
    assert refused.first_query_flag == 1
    flagged = oracle(FakeEndpoint(flag=lambda x: True))
    assert flagged(bright).tolist() == [[1, 0, 0]] * 2 and flagged.best is None
    ignoring = oracle(FakeEndpoint(flag=lambda x: True), evade_guard=False)
    assert ignoring(bright).tolist() == [[0, 1, 0]] * 2 and ignoring.best is not None


def test_sybil_queries_rotate_over_identities():
    endpoint = FakeEndpoint()
    o = oracle(endpoint, identities=3, client_header="x-api-key")
    o(np.zeros((4, 3, 4, 4), np.float32))
    assert endpoint.sent == ["attacker-0", "attacker-1", "attacker-2", "attacker-0"]


def test_oars_resamples_refused_queries_with_stronger_noise_until_one_passes():
    """The fake defence refuses queries whose pixels all equal the source's value (no noise)."""
    endpoint = FakeEndpoint(refuse=lambda x: np.ptp(x) == 0)
    o = oracle(endpoint, oars=5, max_queries=20, eps=0.01)
    assert o(np.full((1, 3, 4, 4), 0.4, np.float32)).tolist() == [[1, 0, 0]]
    assert o.queries == 2 and o.refused == 1 and o.strength == pytest.approx(0.9 * 2 / 255)
    o(np.full((1, 3, 4, 4), 0.4, np.float32))  # still noisy (strength > 0): passes at once
    assert o.queries == 3 and o.strength == pytest.approx(0.81 * 2 / 255)
    far = np.full((3, 4, 4), 0.6, np.float32)
    for norm_attack in ("hopskipjump", "square"):  # the noise stays within eps, or the image's own distance
        o = oracle(endpoint, oars=5, attack=norm_attack, answers="scores", eps=0.01)
        o.strength = 0.3
        assert distortion(o._resample(o.source), o.source, o.params.norm) <= 0.01 + 1e-6
        assert distortion(o._resample(far), o.source, o.params.norm) <= distortion(far, o.source, o.params.norm) + 1e-6
    never = oracle(FakeEndpoint(refuse=lambda x: True), oars=3, max_queries=20)
    never(np.zeros((1, 3, 4, 4), np.float32))
    assert never.queries == 4 and never.strength == pytest.approx(2 / 255 * 1.5**2)
    plain = oracle(FakeEndpoint(refuse=lambda x: True), max_queries=20)
    plain(np.zeros((1, 3, 4, 4), np.float32))
    assert plain.queries == 1


def test_blinding_stays_in_range_and_near_the_image():
    x = np.random.default_rng(0).uniform(0, 1, (3, 8, 8)).astype(np.float32)
    y = blind(x, 4 / 255, np.random.default_rng(1))
    assert y.dtype == np.float32 and y.min() >= 0 and y.max() <= 1 and y.shape == x.shape


def test_plan_picks_correct_images_and_targets_of_other_classes():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    predicted = np.array([0, 1, 2, 1, 1, 2, 0, 0])  # images 3 and 7 misclassified
    plan = plan_query_attack(predicted, labels, 4, True, seed=0)
    assert len(plan.indices) == 4 and not {3, 7} & set(plan.indices)
    for i, t, init in zip(plan.indices, plan.targets, plan.inits):
        assert t != labels[i] and labels[init] == t and predicted[init] == t


@pytest.mark.parametrize("kwargs, match", [
    ({"attack": "fgsm"}, "attack must be one of"),
    ({"attack": "square", "targeted": True}, "untargeted only"),
    ({"answers": "logits"}, "answers must be one of"),
    ({"max_queries": 0}, "max_queries must be >= 1"),
    ({"identities": 5}, "needs client_header"),
    ({"blinding": 1.5}, "blinding must be in"),
    ({"oars": -1}, "oars must be >= 0"),
])
def test_bad_params_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QueryAttackParams(**kwargs)
