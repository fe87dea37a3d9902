"""The offline text-classifier teacher: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes snippets.

`rotten_tomatoes_teacher()` returns the folder of the fine-tuned model (trained once, then cached
by `kdkit.pipelines.finetune`). The settings are those of `recipes/minilm-rotten-tomatoes.yaml`,
so the recipe, the benchmark and this function share one cached teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdkit.models.hf import MINILM_SOURCE

# 80 steps of 32 snippets (2,560 examples, 0.26 of an epoch of the 9,752), sequences cut at 40
# tokens (the mean snippet is 27 tokens; 12% are cut). Sized for a 2-core CPU shared by many jobs,
# where one step of the 22.7M-parameter encoder took 6-30 s; on a free machine or a GPU, a full
# epoch at max_length 64 gives a stronger teacher (pass steps=305 and max_length=64).
TEACHER_SETTINGS: dict[str, Any] = {
    "steps": 80, "batch_size": 32, "lr": 1e-4, "weight_decay": 0.01, "warmup_steps": 8,
    "schedule": "cosine", "seed": 0,
}
MAX_LENGTH = 40


def rotten_tomatoes_teacher(
    log: Callable[[str], None] = print, max_length: int = MAX_LENGTH, **overrides: Any
) -> Path:
    """Folder of MiniLM-L6 + a 2-way head fine-tuned on the Rotten Tomatoes train split (cached)."""
    from kdkit.data.rotten_tomatoes import rotten_tomatoes_dataset
    from kdkit.pipelines.finetune import finetuned_teacher

    settings = {**TEACHER_SETTINGS, **overrides}
    return finetuned_teacher(
        MINILM_SOURCE, rotten_tomatoes_dataset("train"), eval_data=rotten_tomatoes_dataset("validation"),
        task="sequence-classification", num_labels=2, name="minilm-rotten-tomatoes",
        input_column="text", label_column="label", max_length=max_length, log=log, **settings,
    )


__all__ = ["MAX_LENGTH", "TEACHER_SETTINGS", "rotten_tomatoes_teacher"]
