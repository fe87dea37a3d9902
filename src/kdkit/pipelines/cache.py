"""Teacher-logit caches of an LM run: build them (`kdkit cache CONFIG`) and train students from them.

`run_cache(cfg)` loads the run's teacher and training data exactly as `kdkit run` does and writes
every cache of `cfg.caches` (resumable; under `accelerate launch` or torchrun each process writes
the shards i ≡ RANK mod WORLD_SIZE). `prepare_cached_training` is what `kdkit run` does when a
student names a cache: build what is missing, check each cache was made from this run's teacher
weights, tokenizer and data (refusing with what differs), and give the training batches the
sample indices the cache is read by.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from kdkit.cache import CacheReader, CacheSummary, write_caches
from kdkit.cache.batch import IndexedCollate, IndexedSamples
from kdkit.cache.identity import data_identity, sample_crcs, teacher_identity, tokenizer_identity
from kdkit.config.lm import LMRunConfig, LMStudentRun
from kdkit.paths import cache_dir
from kdkit.settings import ConfigError

Log = Callable[[str], None]


def cache_folder(cfg: LMRunConfig, name: str) -> Path:
    """Where cache `name` of the run lives (its `path`, or a folder keyed by teacher, data, settings)."""
    spec = cfg.caches[name]
    if spec.path is not None:
        return Path(spec.path).expanduser()
    key = json.dumps(
        {
            "teacher": cfg.teacher.model_dump(mode="json"),
            "data": cfg.data.model_dump(mode="json"),
            "cache": spec.settings().stored(),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir("logits") / f"{cfg.name}-{name}-{digest}"


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the environment `accelerate launch` / torchrun set; (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_caches(
    cfg: LMRunConfig,
    names: Iterable[str],
    *,
    teacher: nn.Module,
    tokenizer: Any,
    train: Any,
    collate: Any,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    verify: bool = True,
    log: Log = print,
) -> dict[str, CacheSummary]:
    """Write (or finish, or repair) each named cache of `cfg` over the training samples.

    Caches that share `samples_per_shard` and `batch_size` are written in one teacher pass
    (`kdkit.cache.write_caches`): the teacher runs once for all of them.
    """
    names = list(names)
    for name in names:
        if name not in cfg.caches:
            raise ConfigError(
                f"{name!r} is not a cache of this run (known: {', '.join(cfg.caches) or 'none'})"
            )
    groups: dict[tuple[int, int], list[str]] = {}
    for name in names:
        spec = cfg.caches[name]
        groups.setdefault((spec.settings().samples_per_shard, spec.batch_size), []).append(name)
    out = {}
    for (_, batch_size), group in groups.items():
        for name in group:
            log(f"kdkit: cache {name} ({cfg.caches[name].mode}) at {cache_folder(cfg, name)}")
        if len(group) > 1:
            log(f"kdkit: one teacher pass for caches {', '.join(group)}")
        summaries = write_caches(
            [(cache_folder(cfg, name), cfg.caches[name].settings()) for name in group],
            teacher=teacher,
            tokenizer=tokenizer,
            samples=train,
            collate=collate,
            rank=rank,
            world=world,
            batch_size=batch_size,
            progress=progress,
            verify=verify,
            info=[{"run": cfg.name, "cache": name, "teacher_source": cfg.teacher.source} for name in group],
            log=log,
        )
        for name, summary in zip(group, summaries, strict=True):
            done = "complete" if summary.complete else "this process's shards done"
            size = f", {summary.bytes_per_token:.1f} bytes/token" if summary.bytes_per_token else ""
            log(
                f"kdkit: cache {name}: {summary.shards_written} shards written, {summary.shards_reused} "
                f"reused, {len(summary.damaged)} repaired, {summary.seconds:.0f} s; {done}{size}"
            )
            out[name] = summary
    return out


def run_cache(
    cfg: LMRunConfig, *, only: list[str] | None = None, log: Log = print
) -> dict[str, CacheSummary]:
    """`kdkit cache CONFIG`: build the run's caches (all, or `only` these) with its teacher and data."""
    from kdkit.pipelines.lm import load_lm_data, load_teacher

    names = only or list(cfg.caches)
    if not names:
        raise ConfigError("this config has no caches: section (see kdkit.config.cache)")
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    teacher, tokenizer = load_teacher(cfg, log=log)
    data = load_lm_data(cfg, tokenizer)
    rank, world = process_rank()
    return build_caches(
        cfg,
        names,
        teacher=teacher,
        tokenizer=tokenizer,
        train=data.train,
        collate=data.collate,
        rank=rank,
        world=world,
        log=log,
    )


def student_caches(cfg: LMRunConfig) -> dict[str, str]:
    """{student name: the `cache` it names} for the students that train from a cache."""
    out = {}
    for student in cfg.students:
        params = student.method_params()
        if getattr(params, "cache", None) and params.kd_weight > 0:
            out[student.name] = params.cache
    return out


def prepare_cached_training(
    cfg: LMRunConfig, *, teacher: nn.Module, tokenizer: Any, train: Any, collate: Any, log: Log = print
) -> tuple[dict[str, Path], Any, Any]:
    """Build missing caches, check each against this run, index the training samples.

    Returns ({cache name or path as written: its folder}, training samples carrying `cache_index`,
    the collate function that keeps it); ({}, train, collate) unchanged when no student uses a cache.
    Raises ManifestMismatchError naming what differs when a cache was built for another teacher,
    tokenizer or data.
    """
    wanted = sorted(set(student_caches(cfg).values()))
    if not wanted:
        return {}, train, collate
    own = [name for name in wanted if name in cfg.caches]
    # verify=False: sizes only here; every shard's checksum is verified when training first reads it
    build_caches(
        cfg, own, teacher=teacher, tokenizer=tokenizer, train=train, collate=collate, verify=False, log=log
    )
    expected = {
        "teacher": teacher_identity(teacher),
        "tokenizer": tokenizer_identity(tokenizer),
        "data": data_identity(sample_crcs(train, collate)),
    }
    folders = {}
    for name in wanted:
        folder = cache_folder(cfg, name) if name in cfg.caches else Path(name).expanduser()
        reader = CacheReader(folder, expect=expected, sections=("teacher", "tokenizer", "data"))
        reader.require_complete()
        folders[name] = folder
    return folders, IndexedSamples(train), IndexedCollate(collate)


def resolve_student(student_cfg: LMStudentRun, folders: dict[str, Path]) -> LMStudentRun:
    """The student's entry with `cache` (a cache name) replaced by the cache's folder."""
    extra = dict(student_cfg.model_extra or {})
    name = extra.get("cache")
    if not name or name not in folders:
        return student_cfg
    extra["cache"] = str(folders[name])
    return LMStudentRun.model_validate({"name": student_cfg.name, "method": student_cfg.method, **extra})


__all__ = [
    "build_caches",
    "cache_folder",
    "prepare_cached_training",
    "process_rank",
    "resolve_student",
    "run_cache",
    "student_caches",
]
