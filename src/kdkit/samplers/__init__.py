"""Where LM training sequences come from: dataset, teacher, student, or a λ-mixture (batch transforms)."""

from kdkit.samplers.collate import IGNORE_INDEX, PromptCompletionCollator, build_lm_batch, left_pad, right_pad
from kdkit.samplers.generation import GenerationSettings, completion_lengths, generate_batch
from kdkit.samplers.sources import DatasetSampler, MixtureSampler, StudentSampler, TeacherSampler

__all__ = [
    "IGNORE_INDEX",
    "DatasetSampler",
    "GenerationSettings",
    "MixtureSampler",
    "PromptCompletionCollator",
    "StudentSampler",
    "TeacherSampler",
    "build_lm_batch",
    "completion_lengths",
    "generate_batch",
    "left_pad",
    "right_pad",
]
