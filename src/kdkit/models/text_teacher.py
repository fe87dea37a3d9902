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

# One epoch of the 9,752 training snippets (305 steps of 32), sequences cut at 64 tokens (8 of
# 9,752 snippets are longer). Kept short so a CPU fine-tunes it in minutes, not hours.
TEACHER_SETTINGS: dict[str, Any] = {
    "steps": 305, "batch_size": 32, "lr": 1e-4, "weight_decay": 0.01, "warmup_steps": 30,
    "schedule": "cosine", "seed": 0,
}
MAX_LENGTH = 64


def rotten_tomatoes_teacher(log: Callable[[str], None] = print, **overrides: Any) -> Path:
    """Folder of MiniLM-L6 + a 2-way head fine-tuned on the Rotten Tomatoes train split (cached)."""
    from kdkit.data.rotten_tomatoes import rotten_tomatoes_dataset
    from kdkit.pipelines.finetune import finetuned_teacher

    settings = {**TEACHER_SETTINGS, **overrides}
    return finetuned_teacher(
        MINILM_SOURCE, rotten_tomatoes_dataset("train"), eval_data=rotten_tomatoes_dataset("validation"),
        task="sequence-classification", num_labels=2, name="minilm-rotten-tomatoes",
        input_column="text", label_column="label", max_length=MAX_LENGTH, log=log, **settings,
    )


__all__ = ["MAX_LENGTH", "TEACHER_SETTINGS", "rotten_tomatoes_teacher"]
