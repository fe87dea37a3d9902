"""Privacy accounting for DP-SGD: thin wrappers over Opacus' RDP and PRV accountants.

Every function here assumes what Opacus' accountants assume: each optimizer step applies the
Poisson-subsampled Gaussian mechanism, i.e. every record joins a step's batch independently with
probability `sample_rate` (q), each record's gradient is clipped to norm C, and Gaussian noise of
standard deviation `noise_multiplier`·C (σ·C) is added to the sum. ε is then a function of (q, σ,
steps, δ) alone; C does not enter. Use these to plan a run before starting it.
"""

from __future__ import annotations

import math
from typing import Literal

Accountant = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")


def _check(sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate (the Poisson sampling probability q) must be in (0, 1], "
                         f"got {sample_rate}")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def make_accountant(accountant: Accountant = "rdp"):  # -> opacus.accountants.IAccountant
    """A fresh Opacus accountant ("rdp": RDPAccountant, "prv": PRVAccountant)."""
    from opacus.accountants import create_accountant

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return create_accountant(mechanism=accountant)


def accountant_epsilon(
    history: list[tuple[float, float, int]], delta: float, accountant: Accountant = "rdp"
) -> float:
    """ε at δ of a run whose steps are `history`: [(noise_multiplier, sample_rate, steps), ...].

    This is the form Opacus' accountants keep (one entry per run of identical steps), so a run
    that changed σ or q part-way is accounted exactly. No steps -> 0.0; σ = 0 -> inf.
    """
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    if any(s == 0.0 for s, _, _ in history):
        return math.inf  # no noise: no finite guarantee
    acc = make_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: Accountant = "rdp",
) -> float:
    """ε spent after `steps` DP-SGD steps with Poisson rate q = `sample_rate` and noise σ.

    sample_rate: q in (0, 1], e.g. expected batch size / number of records.
    noise_multiplier: σ ≥ 0 (noise std / clipping norm); σ = 0 gives inf.
    delta: the δ of (ε, δ)-DP, in (0, 1); usually ≤ 1/N.
    accountant: "rdp" (Rényi DP, Mironov et al.; a slightly loose upper bound) or "prv" (privacy
        loss random variables, Gopi et al.; tighter; Opacus' upper estimate with eps_error 0.01).
    Returns ε (dimensionless). Same value as Opacus' accountant stepped `steps` times.
    """
    _check(sample_rate, steps, delta, accountant)
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    return accountant_epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_for_epsilon(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest σ (to within Opacus' binary search) whose ε after `steps` steps is ≤ target.

    Wraps `opacus.accountants.utils.get_noise_multiplier`; the returned σ satisfies
    `epsilon(sample_rate, σ, steps, delta, accountant) <= target_epsilon` and ε is within
    `epsilon_tolerance` of the target. Raises ValueError when no σ ≤ 1e6 reaches the target.
    """
    _check(sample_rate, steps, delta, accountant)
    if steps == 0:
        raise ValueError("steps must be > 0 to derive a noise multiplier")
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
        )
    )
