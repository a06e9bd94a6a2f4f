"""Adversarial sites: what each attack sends, and who the attackers are."""

from __future__ import annotations

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
