"""Adversarial sites: what each attack sends, and who the attackers are."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedloom.attacks import (
    Attack,
    AttackKind,
    choose_attackers,
    flip_labels,
    parse_attack,
    poison_update,
)
from fedloom.core.records import EvalOutput, SiteAnswer, TrainOutput
from fedloom.simulation.attacked import AttackedTask
from fedloom.tasks.base import SiteData

DELTA = {"w": np.array([0.5, -1.0, 2.0], np.float32), "n": np.array(3, np.int64)}


def _attack(kind: AttackKind, factor: float = 1.0) -> Attack:
    return Attack(kind, factor, frozenset({"site-01"}))


def test_parse_attack_forms_and_errors() -> None:
    assert parse_attack("sign-flip") == (AttackKind.SIGN_FLIP, 1.0)
    assert parse_attack("scale:-4") == (AttackKind.SCALE, -4.0)
    assert parse_attack("gaussian") == (AttackKind.GAUSSIAN, 1.0)
    assert parse_attack("gaussian:0.5") == (AttackKind.GAUSSIAN, 0.5)
    for bad, message in [
        ("teleport", "unknown attack"),
        ("scale:x", "is not a number"),
        ("sign-flip:2", "takes no argument"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_attack(bad)


def test_poisoned_updates() -> None:
    rng = np.random.default_rng(0)
    flipped = poison_update(DELTA, _attack(AttackKind.SIGN_FLIP), rng)
    np.testing.assert_array_equal(flipped["w"], -DELTA["w"])
    scaled = poison_update(DELTA, _attack(AttackKind.SCALE, -4.0), rng)
    np.testing.assert_array_equal(scaled["w"], np.array([-2.0, 4.0, -8.0], np.float32))
    noise = poison_update(DELTA, _attack(AttackKind.GAUSSIAN, 3.0), rng)
    assert noise["w"].dtype == np.float32 and not np.array_equal(noise["w"], DELTA["w"])
    for out in (flipped, scaled, noise):
        assert out["n"] == 3  # integer counters are left alone


def test_attackers_are_drawn_from_the_roster_by_seed() -> None:
    roster = tuple(f"site-{i:02d}" for i in range(1, 11))
    a = choose_attackers(roster, 2, seed=0)
    assert len(a) == 2 and a <= set(roster)
    assert a == choose_attackers(roster, 2, seed=0)
    assert choose_attackers(roster, 0, seed=0) == frozenset()
    with pytest.raises(ValueError, match="only 10 sites"):
        choose_attackers(roster, 11, seed=0)


def test_label_flip() -> None:
    np.testing.assert_array_equal(flip_labels(np.array([0, 1, 9]), 10), np.array([9, 8, 0]))


def test_gaussian_noise_needs_a_positive_deviation() -> None:
    for bad in ("gaussian:-1", "gaussian:0"):
        with pytest.raises(ValueError, match="must be > 0"):
            parse_attack(bad)


class Recording:
    """A task that keeps what it was given (training data) and returns fixed weights."""

    supports_dp_sgd = True

    def __init__(self) -> None:
        self.seen: list[SiteData] = []

    def init_weights(self, seed: int) -> dict[str, np.ndarray]:
        return {"w": np.zeros(3, np.float32)}

    def train(self, weights: Any, data: SiteData, settings: Any, context: Any) -> TrainOutput:
        self.seen.append(data)
        return TrainOutput({"w": weights["w"] + 1}, len(data.y_train), {})

    def evaluate(self, weights: Any, data: Any, context: Any) -> EvalOutput:
        return EvalOutput(7, {"accuracy": 0.5})


def test_an_attacking_site_runs_the_task_wrapped() -> None:
    """The executor knows nothing of attacks: label-flip changes the training labels the
    task gets (not the validation ones), the others the update the site sends."""
    data = SiteData(np.zeros((3, 2)), np.array([0, 1, 2]), np.zeros((1, 2)), np.array([1]))
    inner = Recording()
    flipping = AttackedTask(inner, _attack(AttackKind.LABEL_FLIP), num_classes=3, plan_seed=0)
    flipping.train({"w": np.zeros(3, np.float32)}, data, None, None)
    np.testing.assert_array_equal(inner.seen[0].y_train, [2, 1, 0])
    np.testing.assert_array_equal(inner.seen[0].y_val, [1])
    assert flipping.supports_dp_sgd and flipping.evaluate({}, data, None).num_samples == 7
    honest = SiteAnswer(3, {}, dict(DELTA))
    flipped_answer = flipping.sent(honest, "site-01", 1)
    assert all(np.array_equal(flipped_answer.delta[k], DELTA[k]) for k in DELTA)

    scaling = AttackedTask(inner, _attack(AttackKind.SCALE, -10), num_classes=3, plan_seed=0)
    scaling.train({"w": np.zeros(3, np.float32)}, data, None, None)
    np.testing.assert_array_equal(inner.seen[1].y_train, [0, 1, 2])  # its labels as they are
    sent = scaling.sent(honest, "site-01", 1)
    np.testing.assert_array_equal(sent.delta["w"], np.array([-5.0, 10.0, -20.0], np.float32))
    assert sent.num_samples == 3 and scaling.sent(SiteAnswer(3, {}, None), "s", 1).delta is None
