"""Run the teacher over a dataset once and store its sparse distributions (see `kdkit.cache.format`).

`write_cache` is resumable and parallel:

- shard i holds samples [i·S, (i+1)·S); process `rank` of `world` writes shards i ≡ rank (mod world),
  so several processes (e.g. under `accelerate launch`) write disjoint ranges with no coordination;
- a rerun skips every shard whose record and checksum are intact, reports damaged or truncated ones,
  and recomputes them and any missing ones; random draws are seeded per shard, so a recomputed shard
  is byte-identical to the one an uninterrupted run would have written;
- a folder holding a cache of another teacher, tokenizer, data or settings is refused (with what
  differs), never extended.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdkit.cache.format import FORMAT_VERSION, CacheSettings, concat_blocks, encode_positions, id_width
from kdkit.cache.identity import data_identity, sample_crcs, teacher_identity, tokenizer_identity
from kdkit.cache.store import CacheStore, json_sha256, serialize
from kdkit.losses.divergences import temperature_log_probs

Log = Callable[[str], None]


@dataclass
class CacheSummary:
    """What one `write_cache` call did (this process's share)."""

    path: Path
    shards_total: int
    shards_mine: int
    shards_written: int
    shards_reused: int
    damaged: list[tuple[int, str]] = field(default_factory=list)
    positions_written: int = 0
    seconds: float = 0.0
    complete: bool = False  # every shard of the cache (all processes) is present
    bytes_per_token: float | None = None  # whole cache, when complete


def build_manifest(
    *,
    teacher: dict[str, Any],
    tokenizer: dict[str, Any],
    data: dict[str, Any],
    settings: CacheSettings,
    vocab_size: int,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest: everything that determines the stored values, plus descriptive `info`."""
    return {
        "format_version": FORMAT_VERSION,
        "teacher": teacher,
        "tokenizer": tokenizer,
        "data": data,
        "settings": settings.stored(),
        "vocab_size": vocab_size,
        "id_bytes": id_width(vocab_size),
        "info": info or {},
    }


def teacher_vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            "cannot tell the teacher's vocabulary size (no config.vocab_size, no output embeddings)"
        )
    return int(head.weight.shape[0])


def num_shards(num_samples: int, settings: CacheSettings) -> int:
    return -(-num_samples // settings.samples_per_shard)


def write_cache(
    root: str | Path,
    *,
    teacher: nn.Module,
    tokenizer: Any,
    samples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    settings: CacheSettings,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    verify: bool = True,
    info: dict[str, Any] | None = None,
    log: Log = print,
) -> CacheSummary:
    """Cache the teacher's distribution at every trained position of `samples` under `root`.

    teacher: a causal LM called as teacher(input_ids=, attention_mask=) returning `.logits` [B, T, V].
    samples / collate: the training samples and the function that batches them (input_ids, labels,
        attention_mask); positions whose shifted label is -100 are not stored.
    rank / world: this process's share of the shards.
    verify: check existing shards' SHA-256 (reads them) rather than only their size.
    Returns this process's `CacheSummary`; raises ManifestMismatchError for a folder of another cache.
    See `write_caches` for several caches from one teacher pass, and for concurrent writers.
    """
    (summary,) = write_caches(
        [(root, settings)],
        teacher=teacher,
        tokenizer=tokenizer,
        samples=samples,
        collate=collate,
        rank=rank,
        world=world,
        batch_size=batch_size,
        device=device,
        progress=progress,
        verify=verify,
        info=[info],
        log=log,
    )
    return summary


@dataclass
class _Target:
    """One cache being written: its folder, settings, manifest checksum, summary, shards to do."""

    store: CacheStore
    settings: CacheSettings
    manifest_sha: str
    summary: CacheSummary
    todo: set[int]


def write_caches(
    caches: Sequence[tuple[str | Path, CacheSettings]],
    *,
    teacher: nn.Module,
    tokenizer: Any,
    samples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    rank: int = 0,
    world: int = 1,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    verify: bool = True,
    info: Sequence[dict[str, Any] | None] | None = None,
    log: Log = print,
) -> list[CacheSummary]:
    """Write several caches of one teacher and data (e.g. top-8, top-128 and sampled) in ONE teacher
    pass: each batch's logits are encoded once per cache. Arguments as `write_cache`; `caches` are
    (folder, settings) pairs sharing `samples_per_shard`; `info` one entry per cache.

    Concurrent writers: each (cache, shard) is written under an exclusive lock (`CacheStore.lock`),
    and checked again once locked, so processes that write the same cache at once (same or
    overlapping ranks) never compute a shard twice, never delete each other's temporaries, and
    never judge a shard that another is between writing and recording as damaged. A shard locked
    by another process is left for last, then waited for (and normally found done).
    Returns one `CacheSummary` per cache (this process's share), in the order given.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world), got rank={rank}, world={world}")
    if not caches:
        return []
    per_shard = {settings.samples_per_shard for _, settings in caches}
    if len(per_shard) != 1:
        raise ValueError(
            f"caches written in one teacher pass must share samples_per_shard (got {sorted(per_shard)}); "
            "write them separately"
        )
    infos = list(info) if info is not None else [None] * len(caches)
    started = time.perf_counter()
    vocab = teacher_vocab_size(teacher)
    crcs = sample_crcs(samples, collate)
    identity = {
        "teacher": teacher_identity(teacher),
        "tokenizer": tokenizer_identity(tokenizer),
        "data": data_identity(crcs),
    }
    S = per_shard.pop()
    total = -(-len(samples) // S)
    mine = list(range(rank, total, world))
    targets = []
    for (root, settings), extra in zip(caches, infos, strict=True):
        settings.check_vocab(vocab)
        manifest = build_manifest(**identity, settings=settings, vocab_size=vocab, info=extra)
        store = CacheStore(root)
        store.ensure_manifest(manifest)
        # a first look without locks: what may need work (checked again under the shard's lock)
        todo = {s for s in mine if store.problem(s, store.record(s), full=verify) is not None}
        summary = CacheSummary(
            path=Path(root), shards_total=total, shards_mine=len(mine), shards_written=0, shards_reused=0
        )
        sha = json_sha256({k: v for k, v in manifest.items() if k != "info"})
        targets.append(_Target(store, settings, sha, summary, todo))
        if len(todo) < len(mine):
            log(
                f"kdkit: {len(mine) - len(todo)} of this process's {len(mine)} shards of {root} already "
                "cached; continuing"
            )

    device = torch.device(device or "cpu")
    teacher = teacher.to(device).eval()
    shards = sorted(set().union(*(t.todo for t in targets)))
    bar = _progress(sum(min(S, len(samples) - i * S) for i in shards), enabled=progress)
    try:
        def write(shard: int, block: bool) -> list[int]:
            return _write_shard(
                shard, targets, teacher, samples, collate, crcs, vocab, batch_size, device, bar, verify, log,
                block=block,
            )

        waiting = [held for shard in shards for held in write(shard, block=False)]
        for shard in sorted(set(waiting)):  # locked by another process: wait, then do what is left
            write(shard, block=True)
    finally:
        bar.close()
    out = []
    for target in targets:
        summary = target.summary
        summary.shards_reused = len(mine) - summary.shards_written  # intact, or written by another process
        index = target.store.write_index(total)
        summary.complete = index is not None
        if index is not None and index["totals"]["positions"]:
            summary.bytes_per_token = index["totals"]["bytes"] / index["totals"]["positions"]
        summary.seconds = time.perf_counter() - started
        out.append(summary)
    return out


def _write_shard(
    shard: int,
    targets: list[_Target],
    teacher: nn.Module,
    samples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    crcs: np.ndarray,
    vocab: int,
    batch_size: int,
    device: torch.device,
    bar: Any,
    verify: bool,
    log: Log,
    *,
    block: bool,
) -> list[int]:
    """Compute `shard` once for every target that still needs it, under its locks.

    Returns [shard] if some target's lock is held by another process (block=False), else [].
    """
    with contextlib.ExitStack() as locks:
        needed, busy = [], False
        for target in targets:
            if shard not in target.todo:
                continue
            if not locks.enter_context(target.store.lock(shard, block=block)):
                busy = True
                continue
            target.todo.discard(shard)
            # checked again under the lock: another process may have finished (or be repairing) it
            problem = target.store.problem(shard, target.store.record(shard), full=verify)
            if problem is None:
                continue
            target.store.clean_temporaries([shard])
            if problem != "missing":
                target.summary.damaged.append((shard, problem))
                root = target.store.root
                log(f"kdkit: cache shard {shard} of {root} is unusable ({problem}); recomputing it")
                target.store.remove_shard(shard)
            needed.append(target)
        if needed:
            S = needed[0].settings.samples_per_shard
            first, last = shard * S, min((shard + 1) * S, len(samples))
            computed = _compute_shard(
                teacher,
                samples,
                collate,
                first,
                last,
                [t.settings for t in needed],
                vocab,
                batch_size,
                device,
                bar,
            )
            for target, arrays in zip(needed, computed, strict=True):
                arrays["sample_crc"] = crcs[first:last]
                metadata = {
                    "shard": str(shard),
                    "first_sample": str(first),
                    "manifest_sha256": target.manifest_sha,
                }
                positions = int(arrays["sample_tokens"].sum())
                target.store.write_shard(
                    shard,
                    serialize(arrays, metadata),
                    {"first_sample": first, "samples": last - first, "positions": positions},
                )
                target.summary.shards_written += 1
                target.summary.positions_written += positions
    return [shard] if busy else []


@torch.no_grad()
def _compute_shard(
    teacher: nn.Module,
    samples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    first: int,
    last: int,
    settings: Sequence[CacheSettings],
    vocab: int,
    batch_size: int,
    device: torch.device,
    bar: Any,
) -> list[dict[str, np.ndarray]]:
    """The arrays of shard [first, last) for each of `settings`, from one teacher forward per batch."""
    # Seeded by (seed, first sample) only: the same shard gets the same draws in any run or process.
    generators = [torch.Generator().manual_seed(s.seed * 1_000_003 + first) for s in settings]
    blocks: list[list[dict[str, np.ndarray]]] = [[] for _ in settings]
    tokens = []
    for start in range(first, last, batch_size):
        stop = min(start + batch_size, last)
        batch = collate([samples[i] for i in range(start, stop)])
        out = teacher(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        )
        logits = out.logits if hasattr(out, "logits") else out
        mask = (batch["labels"][:, 1:] != -100).to(device)
        rows = logits[:, :-1][mask]  # [n, V]: sample by sample, positions in order
        tokens.extend(mask.sum(1).tolist())
        if rows.shape[0]:
            # one log-softmax (and one entropy, in the memo) per distinct temperature, on the
            # teacher's device: encode_positions moves only what it keeps to the host
            log_p: dict[float, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
            for i, setting in enumerate(settings):
                if setting.temperature not in log_p:
                    log_p[setting.temperature] = (temperature_log_probs(rows, setting.temperature), {})
                values, memo = log_p[setting.temperature]
                blocks[i].append(encode_positions(values, setting, vocab, generators[i], memo))
        bar.update(stop - start)
    out_arrays = []
    for setting, parts in zip(settings, blocks, strict=True):
        if not parts:  # a shard with no trained position: empty arrays of the right dtypes and widths
            parts = [
                {k: v[:0] for k, v in encode_positions(torch.zeros(1, vocab), setting, vocab, None).items()}
            ]
        out_arrays.append(concat_blocks(parts) | {"sample_tokens": np.asarray(tokens, dtype=np.uint32)})
    return out_arrays


def _progress(total: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc="kdkit cache", disable=not enabled, dynamic_ncols=True)
