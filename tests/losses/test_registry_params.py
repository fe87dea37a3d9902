"""Declared parameters of registry entries: defaults read once from the signature, values checked."""

from __future__ import annotations

import pytest

from kdkit.losses import DIVERGENCES
from kdkit.losses.registry import Param, Registry


def test_defaults_come_from_the_signature() -> None:
    assert DIVERGENCES.params("jsd")["beta"].default == 0.5
    assert DIVERGENCES.params("skew_kl")["alpha"].default == 0.1  # aliases resolve
    assert DIVERGENCES.params("fkl") == {}


def test_check_params_fills_defaults_and_refuses_bad_values() -> None:
    assert DIVERGENCES.check_params("jsd", {}) == {"beta": 0.5}
    assert DIVERGENCES.check_params("jsd", {"beta": 0.0}) == {"beta": 0.0}
    with pytest.raises(ValueError, match=r"beta=1.5 is outside \[0, 1\]"):
        DIVERGENCES.check_params("jsd", {"beta": 1.5})
    with pytest.raises(
        ValueError, match="'bta' is not a parameter of divergence 'jsd' \\(its parameters: beta\\)"
    ):
        DIVERGENCES.check_params("jsd", {"bta": 0.5})
    with pytest.raises(ValueError, match="must be a number"):
        DIVERGENCES.check_params("skl", {"alpha": "high"})
    with pytest.raises(ValueError, match="choose one of"):
        DIVERGENCES.check_params("f", {"f": "klx"})


def test_declaring_a_parameter_the_entry_does_not_take_fails_at_registration() -> None:
    registry: Registry = Registry("thing")

    def entry(x, *, scale: float = 2.0):
        return x * scale

    registry.add("ok", entry, "d", params={"scale": Param(low=0)})
    assert registry.params("ok")["scale"].default == 2.0
    with pytest.raises(ValueError, match="not an argument"):
        registry.add("bad", entry, "d", params={"shift": Param()})
    assert "bad" not in registry  # nothing half-registered
