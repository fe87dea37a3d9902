"""The planning teacher policy: a tiny LM trained from scratch on the expert's plans, then cached.

The task (scenarios, expert planner, execution, metrics) is `kdkit.tasks.planning`; this module
trains the teacher with kdkit's engine and caches it as a plain Hugging Face folder under
`cache_dir("teachers", "planning-<hash of config>")`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kdkit.paths import cache_dir
from kdkit.pipelines.teachers import load_or_build_lm, train_tiny_lm
from kdkit.tasks.planning import (
    DIFFICULTIES,
    PLANNING_FORMAT_VERSION,
    TRAIN_DIFFICULTIES,
    make_scenarios,
    plan_metrics,
    planning_dataset,
    planning_tokenizer,
)

log = logging.getLogger(__name__)


@dataclass
class PlanningTeacherConfig:
    """Everything that determines the cached planning teacher; its hash names the cache folder."""

    difficulties: tuple[str, ...] = TRAIN_DIFFICULTIES
    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 192
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    seed: int = 0
    format_version: int = field(default=PLANNING_FORMAT_VERSION)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def get_planning_teacher(
    config: PlanningTeacherConfig | None = None, *, retrain: bool = False, progress: bool = True
) -> tuple[nn.Module, Any, Path]:
    """The planning teacher policy, trained from scratch on expert plans on first use and cached.

    Returns (model in eval mode, tokenizer, folder); `<folder>/kdkit_teacher.json` holds the config,
    training seconds and its success / collision / off-grid rates by difficulty on 400 held-out
    scenarios (including "ood", larger than its training grids).
    """
    config = config or PlanningTeacherConfig()
    folder = cache_dir("teachers", f"planning-{config.key()}")

    def build() -> tuple[nn.Module, Any]:
        tokenizer = planning_tokenizer()
        samples = planning_dataset(config.steps * config.batch_size, config.difficulties, seed=config.seed)
        model, seconds = train_tiny_lm(tokenizer, config, samples, folder / "run", progress=progress)
        model = model.eval()
        held_out = make_scenarios(400, tuple(DIFFICULTIES), seed=30_000 + config.seed)
        metrics = plan_metrics(model, tokenizer, held_out)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        info = {"config": asdict(config), "train_seconds": seconds, "metrics_by_difficulty": metrics}
        (folder / "kdkit_teacher.json").write_text(json.dumps(info, indent=2))
        log.info("planning teacher trained in %.0f s: %s", seconds, metrics)
        return model, tokenizer

    return (*load_or_build_lm(folder, "kdkit_teacher.json", build, retrain=retrain), folder)


__all__ = ["PlanningTeacherConfig", "get_planning_teacher"]
