"""Teachers that kdkit trains itself, once, and caches: the arithmetic LM teacher.

Training a model is pipeline work (tasks only define problems and checkers), so it lives here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kdkit.config.lm import ArithmeticTeacherConfig
from kdkit.engine import TrainConfig, train
from kdkit.methods.lm_distiller import LMDistiller
from kdkit.paths import cache_dir, file_lock
from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.tasks.arithmetic import (
    FORMAT_VERSION,
    arithmetic_dataset,
    arithmetic_tokenizer,
    build_arithmetic_lm,
    exact_match_by_length,
    make_problems,
)

log = logging.getLogger(__name__)


def arithmetic_teacher_key(config: ArithmeticTeacherConfig) -> str:
    """Hash of the teacher's settings and the task's text format: the cache folder's suffix."""
    blob = json.dumps({**config.model_dump(mode="json"), "format_version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_cached_lm(folder: Path, marker: str, *, retrain: bool = False) -> tuple[nn.Module, Any] | None:
    """(model in eval mode, tokenizer) from a cache folder that holds `marker` (written last, after
    the weights), or None when it is missing or `retrain` is set."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if retrain or not (folder / marker).exists():
        return None
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(folder)


def load_or_build_lm(
    folder: Path, marker: str, build: Callable[[], tuple[nn.Module, Any]], *, retrain: bool = False
) -> tuple[nn.Module, Any]:
    """`load_cached_lm`, else `build()` (which trains the model and writes it with `marker` into
    `folder`) under an exclusive lock (`kdkit.paths.file_lock`): a second process asking for the same
    model meanwhile waits, then loads it, instead of training it too into the same run folder and
    checkpoints."""
    cached = load_cached_lm(folder, marker, retrain=retrain)
    if cached is not None:
        return cached
    with file_lock(folder.parent / f".{folder.name}.lock"):
        if not retrain and (cached := load_cached_lm(folder, marker)) is not None:
            return cached  # another process built it while this one waited
        return build()


def train_tiny_lm(
    tokenizer: Any, config: Any, samples: Sequence[dict[str, Any]], run_dir: Path, **options: Any
) -> tuple[nn.Module, float]:
    """A tiny Llama of `config`'s shape (hidden_size, num_layers, num_heads, intermediate_size,
    seed) trained by `train_causal_lm` on `samples` in `run_dir`; returns (model, training seconds).
    `options` go to `train_causal_lm` (progress, collate_fn)."""
    model = build_arithmetic_lm(
        tokenizer,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        seed=config.seed,
    )
    started = time.perf_counter()
    train_causal_lm(model, tokenizer, samples, config, run_dir, **options)
    return model, time.perf_counter() - started


def get_arithmetic_teacher(
    config: ArithmeticTeacherConfig | None = None, *, retrain: bool = False, device: str | None = None
) -> tuple[nn.Module, Any, Path]:
    """The arithmetic teacher, trained from scratch on first use and cached as a plain HF folder.

    Returns (model in eval mode, tokenizer, folder). The folder is
    `cache_dir("teachers", "arithmetic-<hash of config>")` and holds the model, the tokenizer and
    `kdkit_teacher.json` (config, training seconds, exact match by length on 512 held-out problems,
    including one length past the training range). The training run folder is `<folder>/run`.
    """
    config = config or ArithmeticTeacherConfig()
    folder = cache_dir("teachers", f"arithmetic-{arithmetic_teacher_key(config)}")
    build = lambda: _build_arithmetic_teacher(config, folder, device)  # noqa: E731
    return (*load_or_build_lm(folder, "kdkit_teacher.json", build, retrain=retrain), folder)


def _build_arithmetic_teacher(
    config: ArithmeticTeacherConfig, folder: Path, device: str | None
) -> tuple[nn.Module, Any]:
    tokenizer = arithmetic_tokenizer()
    # Fresh problems for every step (no epoch repeats): steps × batch_size samples.
    samples = arithmetic_dataset(config.steps * config.batch_size, config.digits, seed=config.seed)
    model, seconds = train_tiny_lm(tokenizer, config, samples, folder / "run")
    model = model.to(device or "cpu").eval()
    held_out = make_problems(512, (config.digits[0], config.digits[1] + 1), seed=10_000 + config.seed)
    accuracy = exact_match_by_length(model, tokenizer, held_out, batch_size=128)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {
        "config": config.model_dump(mode="json"),
        "train_seconds": seconds,
        "exact_match_by_length": accuracy,
    }
    (folder / "kdkit_teacher.json").write_text(json.dumps(info, indent=2))
    log.info("arithmetic teacher trained in %.0f s: exact match %s", seconds, accuracy)
    return model, tokenizer


def train_causal_lm(
    model: nn.Module,
    tokenizer: Any,
    samples: Sequence[dict[str, Any]],
    config: ArithmeticTeacherConfig,
    run_dir: Path,
    *,
    progress: bool = True,
    collate_fn: Any | None = None,
) -> None:
    """Cross-entropy on completion tokens with kdkit's engine (AdamW, cosine schedule, warmup).

    An interrupted run resumes from its last checkpoint in `run_dir`. `collate_fn` defaults to
    `PromptCompletionCollator(tokenizer)` (completion + EOS trained on). `config` is any object with
    steps, batch_size, lr, warmup_steps and seed (the judge and planning teachers reuse this).
    """
    # A teacher-less LMDistiller with ce_weight=1 is plain supervised fine-tuning.
    trainer = LMDistiller(model, None, kd_weight=0.0, ce_weight=1.0)
    cfg = TrainConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        weight_decay=0.01,
        seed=config.seed,
        checkpoint_every=max(config.steps // 4, 1),
        log_every=50,
        mixed_precision="no",
        progress=progress,
    )
    collate_fn = collate_fn or PromptCompletionCollator(tokenizer)
    train(trainer, list(samples), cfg, run_dir, collate_fn=collate_fn, resume=True)


__all__ = [
    "arithmetic_teacher_key",
    "get_arithmetic_teacher",
    "load_cached_lm",
    "load_or_build_lm",
    "train_causal_lm",
    "train_tiny_lm",
]
