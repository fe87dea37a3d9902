"""Where LM training sequences come from (`SAMPLERS`): one file per sampler.

Batch layout every sampler reads and returns (see `collate.py`): input_ids / attention_mask /
labels [B, T] (labels = the completion tokens to train on, -100 elsewhere), prompt_ids /
prompt_attention_mask [B, P] (left-padded), plus `source` ("dataset" / "teacher" / "student" / …)
and `sampler_info` (floats for logging: generation seconds, generated tokens, truncated rows).
Generating samplers run on the models they are given, which the distiller passes unwrapped
(inside its own forward), so the engine loop is the same for every method.
"""

from kdkit.samplers.base import GeneratingSampler, GenerationParams, LMContext, NoParams
from kdkit.samplers.collate import IGNORE_INDEX, PromptCompletionCollator, build_lm_batch, left_pad, right_pad
from kdkit.samplers.dataset import DatasetSampler
from kdkit.samplers.generation import GenerationSettings, completion_lengths, generate_batch
from kdkit.samplers.mixture import MixtureParams, MixtureSampler, StudentTeacherSampler
from kdkit.samplers.student import StudentSampler
from kdkit.samplers.teacher import TeacherSampler

__all__ = [
    "IGNORE_INDEX",
    "DatasetSampler",
    "GeneratingSampler",
    "GenerationParams",
    "GenerationSettings",
    "LMContext",
    "MixtureParams",
    "MixtureSampler",
    "NoParams",
    "PromptCompletionCollator",
    "StudentSampler",
    "StudentTeacherSampler",
    "TeacherSampler",
    "build_lm_batch",
    "completion_lengths",
    "generate_batch",
    "left_pad",
    "right_pad",
]
