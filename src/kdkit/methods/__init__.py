"""Named methods (`METHODS`): one small file each, choosing one entry per axis with defaults.

Classifier methods: scratch, kd, dkd, fitnet, at, dist; makd (transformer students). LM
methods: supervised_kd, seqkd, on_policy, gkd, gkd_scheduled, sampled_token, minillm, grpo,
reinforce; private (DP-SGD via `privacy:`): dp_opd, dp_kd, dp_ft. Text-teacher methods (kind
"text": the teacher is reached only as text, through `kdkit.teachers`): text_seqkd, soda, gen_ssd.
Importing this package registers them all.
"""

from kdkit.methods import (
    at,
    dist,
    dkd,
    dp_ft,
    dp_kd,
    dp_opd,
    fitnet,
    gen_ssd,
    gkd,
    kd,
    makd,
    minillm,
    on_policy,
    policy_gradient,
    sampled_token,
    scheduled,
    scratch,
    seqkd,
    soda,
    supervised_kd,
    text_seqkd,
)
from kdkit.methods.base import (
    ClassifierMethod,
    LMMethod,
    LMParts,
    Method,
    classifier_method,
    lm_method,
)
from kdkit.methods.classifier_distiller import ClassifierDistiller
from kdkit.methods.lm_distiller import LMDistiller

__all__ = [
    "ClassifierDistiller",
    "ClassifierMethod",
    "LMDistiller",
    "LMMethod",
    "LMParts",
    "Method",
    "at",
    "classifier_method",
    "dist",
    "dkd",
    "dp_ft",
    "dp_kd",
    "dp_opd",
    "fitnet",
    "gen_ssd",
    "gkd",
    "kd",
    "lm_method",
    "makd",
    "minillm",
    "on_policy",
    "policy_gradient",
    "sampled_token",
    "scheduled",
    "scratch",
    "seqkd",
    "soda",
    "supervised_kd",
    "text_seqkd",
]
