"""Differential privacy: accounting (plan ε before a run), the privacy statement, audits.

`epsilon(q, σ, steps, δ, accountant)` and `noise_for_epsilon(ε, δ, q, steps, accountant)` wrap
Opacus' RDP and PRV accountants. The DP-SGD training loop is `kdkit.engine.private`; the
per-example DP objectives (DP-OPD, DP-KD, DP-FT) are `kdkit.methods.private_distiller`;
`kdkit.privacy.audit` measures canary exposure and membership inference.
"""

from kdkit.privacy.accounting import (
    ACCOUNTANTS,
    accountant_epsilon,
    epsilon,
    make_accountant,
    noise_for_epsilon,
)

__all__ = ["ACCOUNTANTS", "accountant_epsilon", "epsilon", "make_accountant", "noise_for_epsilon"]
