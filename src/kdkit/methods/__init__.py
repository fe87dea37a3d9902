"""Named methods (`METHODS`): one small file each, choosing one entry per axis with defaults.

Classifier methods: scratch, kd, dkd, fitnet, at, dist, makd (transformer students). LM methods:
supervised_kd, seqkd, on_policy, gkd, sampled_token, minillm. Importing this package registers them all.
"""

from kdkit.methods import (
    at,
    dist,
    dkd,
    fitnet,
    gkd,
    kd,
    makd,
    minillm,
    on_policy,
    sampled_token,
    scratch,
    seqkd,
    supervised_kd,
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
    "fitnet",
    "gkd",
    "kd",
    "lm_method",
    "makd",
    "minillm",
    "on_policy",
    "sampled_token",
    "scratch",
    "seqkd",
    "supervised_kd",
]
