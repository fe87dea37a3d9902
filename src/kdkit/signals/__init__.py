"""What the teacher gives (`TEACHER_SIGNALS`): one file per signal."""

from kdkit.signals.base import LMHead, SparseTarget, TeacherSignal, TeacherTarget
from kdkit.signals.cache import CacheSignal
from kdkit.signals.hidden import HiddenSignal, lm_head
from kdkit.signals.logits import LogitsSignal
from kdkit.signals.token_logprobs import TokenLogprobsSignal

__all__ = [
    "CacheSignal",
    "HiddenSignal",
    "LMHead",
    "LogitsSignal",
    "SparseTarget",
    "TeacherSignal",
    "TeacherTarget",
    "TokenLogprobsSignal",
    "lm_head",
]
