"""Pure loss functions on tensors. Imports nothing of kdkit outside this package.

- `divergences`: token-distribution divergences (`DIVERGENCES` registry) and `reduce_positions`.
- `classification`: classifier KD losses (KD, DKD, DIST).
- `features`: feature-matching losses (hint MSE, cosine, attention transfer, attention KL, hidden MSE).
- `preference`: DPO on sequence log-probabilities.
- `fused`: any divergence from hidden states + output projections, chunked over tokens.
- `policy`: policy-gradient losses (GRPO group advantages, the clipped objective, REINFORCE).
"""

from kdkit.losses.classification import dist_loss, dkd_loss, dkd_parts, kd_loss
from kdkit.losses.divergences import (
    DIVERGENCES,
    F_GENERATORS,
    adaptive_kl,
    f_divergence,
    forward_kl,
    generalized_jsd,
    reduce_positions,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    temperature_log_probs,
    total_variation,
)
from kdkit.losses.features import (
    attention_kl,
    attention_map,
    attention_transfer_loss,
    cosine_feature_loss,
    hidden_mse,
    hint_loss,
)
from kdkit.losses.fused import FusedLinearDivergence, auto_chunk_size, fused_linear_divergence
from kdkit.losses.policy import clipped_policy_loss, group_advantages, reinforce_loss
from kdkit.losses.preference import DPOOutput, dpo_loss
from kdkit.losses.registry import Registry, UnknownNameError

__all__ = [
    "DIVERGENCES",
    "DPOOutput",
    "F_GENERATORS",
    "FusedLinearDivergence",
    "Registry",
    "UnknownNameError",
    "adaptive_kl",
    "attention_kl",
    "attention_map",
    "attention_transfer_loss",
    "auto_chunk_size",
    "clipped_policy_loss",
    "cosine_feature_loss",
    "dist_loss",
    "dkd_loss",
    "dkd_parts",
    "dpo_loss",
    "f_divergence",
    "forward_kl",
    "fused_linear_divergence",
    "generalized_jsd",
    "group_advantages",
    "hidden_mse",
    "hint_loss",
    "kd_loss",
    "reduce_positions",
    "reinforce_loss",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "temperature_log_probs",
    "total_variation",
]
