"""What the teacher gives (`TEACHER_SIGNALS`): one file per signal."""

from kdkit.signals.base import LinearHead, SparseTarget, TeacherSignal, TeacherTarget
from kdkit.signals.hidden import HiddenSignal
from kdkit.signals.logits import LogitsSignal
from kdkit.signals.served import ServedSignal
from kdkit.signals.token_logprobs import TokenLogprobsSignal

__all__ = [
    "HiddenSignal",
    "LinearHead",
    "LogitsSignal",
    "ServedSignal",
    "SparseTarget",
    "TeacherSignal",
    "TeacherTarget",
    "TokenLogprobsSignal",
]
