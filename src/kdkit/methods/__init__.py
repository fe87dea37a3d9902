"""Named methods (`METHODS`): one small file each, choosing one entry per axis with defaults.

Classifier methods: scratch, kd, dkd, fitnet, at, dist. LM methods: supervised_kd, seqkd,
on_policy, gkd, sampled_token, minillm. Text-teacher methods (kind "text": the teacher is reached
only as text, through `kdkit.teachers`): text_seqkd, soda, gen_ssd. Importing this package
registers them all.
"""

from kdkit.methods import (
    at,
    dist,
    dkd,
    fitnet,
    gen_ssd,
    gkd,
    kd,
    minillm,
    on_policy,
    sampled_token,
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
    "fitnet",
    "gen_ssd",
    "gkd",
    "kd",
    "lm_method",
    "minillm",
    "on_policy",
    "sampled_token",
    "scratch",
    "seqkd",
    "soda",
    "supervised_kd",
    "text_seqkd",
]
