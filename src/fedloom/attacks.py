"""Adversarial sites for robustness experiments (simulation only).

``--attack KIND --attackers N`` makes N sites of the roster misbehave, so a user can
see what a robust strategy buys them. The attackers are drawn from the roster with
the plan's seed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from fedloom.core.rng import generator
from fedloom.core.weights import Weights, is_float


class AttackKind(enum.Enum):
    SIGN_FLIP = "sign-flip"  # send -delta
    SCALE = "scale"  # send K * delta (scale:K)
    GAUSSIAN = "gaussian"  # send N(0, sigma^2) noise instead of the update (gaussian:SIGMA)
    LABEL_FLIP = "label-flip"  # train on labels y -> (C - 1 - y)


@dataclass(frozen=True)
class Attack:
    kind: AttackKind
    factor: float
    attackers: frozenset[str]


def parse_attack(text: str) -> tuple[AttackKind, float]:
    """``sign-flip``, ``scale:K``, ``gaussian`` / ``gaussian:SIGMA``, ``label-flip``."""
    name, _, arg = text.partition(":")
    try:
        kind = AttackKind(name)
    except ValueError:
        choices = ", ".join(k.value for k in AttackKind)
        raise ValueError(f"unknown attack {text!r}; choose one of {choices}") from None
    default = {AttackKind.SCALE: -1.0, AttackKind.GAUSSIAN: 1.0}.get(kind, 1.0)
    if not arg:
        return kind, default
    if kind not in (AttackKind.SCALE, AttackKind.GAUSSIAN):
        raise ValueError(f"attack {name!r} takes no argument")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"attack {text!r}: {arg!r} is not a number") from None
    if kind is AttackKind.GAUSSIAN and not value > 0:
        raise ValueError(f"attack {text!r}: the noise's standard deviation must be > 0")
    return kind, value


def attack_text(attack: Attack) -> str:
    """What the attacking sites do, for the run's header: ``sign-flip (each sends minus
    its update)``."""
    what = {
        AttackKind.SIGN_FLIP: "sign-flip (each sends minus its update)",
        AttackKind.SCALE: f"scale:{attack.factor:g} (each sends {attack.factor:g} × its update)",
        AttackKind.GAUSSIAN: f"gaussian:{attack.factor:g} (each sends noise of standard "
        f"deviation {attack.factor:g} instead of its update)",
        AttackKind.LABEL_FLIP: "label-flip (each trains on flipped labels)",
    }
    return what[attack.kind]


def choose_attackers(roster: tuple[str, ...], count: int, seed: int) -> frozenset[str]:
    if count <= 0:
        return frozenset()
    if count > len(roster):
        raise ValueError(f"{count} attackers but only {len(roster)} sites")
    rng = generator(seed, 0, "", "attackers")
    picked = rng.choice(len(roster), size=count, replace=False)
    return frozenset(sorted(roster)[i] for i in picked)


def poison_update(delta: Weights, attack: Attack, rng: np.random.Generator) -> Weights:
    """The update an attacker sends instead of its honest ``delta``."""
    out: Weights = {}
    for name, d in delta.items():
        if not is_float(d.dtype):
            out[name] = d
        elif attack.kind is AttackKind.SIGN_FLIP:
            out[name] = (-d.astype(np.float64)).astype(d.dtype)
        elif attack.kind is AttackKind.SCALE:
            out[name] = (d.astype(np.float64) * attack.factor).astype(d.dtype)
        elif attack.kind is AttackKind.GAUSSIAN:
            out[name] = rng.normal(0.0, attack.factor, size=d.shape).astype(d.dtype)
        else:
            out[name] = d
    return out


def flip_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    return (num_classes - 1 - y).astype(y.dtype)
