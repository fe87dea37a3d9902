"""Differential privacy: accounting (plan ε before a run), DP distillation objectives, audits.

`epsilon(q, σ, steps, δ, accountant)` and `noise_for_epsilon(ε, δ, q, steps, accountant)` wrap
Opacus' RDP and PRV accountants. The DP training loop itself is `kdkit.engine.private`.
"""

from kdkit.privacy.accounting import (
    ACCOUNTANTS,
    accountant_epsilon,
    epsilon,
    make_accountant,
    noise_for_epsilon,
)

__all__ = ["ACCOUNTANTS", "accountant_epsilon", "epsilon", "make_accountant", "noise_for_epsilon"]
