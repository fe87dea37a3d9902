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
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world), got rank={rank}, world={world}")
    started = time.perf_counter()
    vocab = teacher_vocab_size(teacher)
    settings.check_vocab(vocab)
    crcs = sample_crcs(samples, collate)
    manifest = build_manifest(
        teacher=teacher_identity(teacher),
        tokenizer=tokenizer_identity(tokenizer),
        data=data_identity(crcs),
        settings=settings,
        vocab_size=vocab,
        info=info,
    )
    store = CacheStore(root)
    store.ensure_manifest(manifest)
    manifest_sha = json_sha256({k: v for k, v in manifest.items() if k != "info"})
    total = num_shards(len(samples), settings)
    mine = list(range(rank, total, world))
    store.clean_temporaries(mine)

    todo, damaged = [], []
    for shard in mine:
        problem = store.problem(shard, store.record(shard), full=verify)
        if problem is None:
            continue
        if problem != "missing":
            damaged.append((shard, problem))
            log(f"kdkit: cache shard {shard} is unusable ({problem}); recomputing it")
            store.remove_shard(shard)
        todo.append(shard)
    summary = CacheSummary(
        path=Path(root),
        shards_total=total,
        shards_mine=len(mine),
        shards_written=0,
        shards_reused=len(mine) - len(todo),
        damaged=damaged,
    )
    if summary.shards_reused:
        log(f"kdkit: {summary.shards_reused} of this process's {len(mine)} shards already cached; continuing")

    device = torch.device(device or "cpu")
    teacher = teacher.to(device).eval()
    S = settings.samples_per_shard
    bar = _progress(sum(min(S, len(samples) - i * S) for i in todo), enabled=progress)
    try:
        for shard in todo:
            first, last = shard * S, min((shard + 1) * S, len(samples))
            arrays = _compute_shard(
                teacher, samples, collate, first, last, settings, vocab, batch_size, device, bar
            )
            arrays["sample_crc"] = crcs[first:last]
            metadata = {"shard": str(shard), "first_sample": str(first), "manifest_sha256": manifest_sha}
            payload = serialize(arrays, metadata)
            positions = int(arrays["sample_tokens"].sum())
            store.write_shard(
                shard, payload, {"first_sample": first, "samples": last - first, "positions": positions}
            )
            summary.shards_written += 1
            summary.positions_written += positions
    finally:
        bar.close()
    index = store.write_index(total)
    summary.complete = index is not None
    if index is not None and index["totals"]["positions"]:
        summary.bytes_per_token = index["totals"]["bytes"] / index["totals"]["positions"]
    summary.seconds = time.perf_counter() - started
    return summary


@torch.no_grad()
def _compute_shard(
    teacher: nn.Module,
    samples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    first: int,
    last: int,
    settings: CacheSettings,
    vocab: int,
    batch_size: int,
    device: torch.device,
    bar: Any,
) -> dict[str, np.ndarray]:
    # Seeded by (seed, first sample) only: the same shard gets the same draws in any run or process.
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + first)
    blocks, tokens = [], []
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
            log_p = temperature_log_probs(rows, settings.temperature).cpu()
            blocks.append(encode_positions(log_p, settings, vocab, generator))
        bar.update(stop - start)
    if not blocks:  # a shard with no trained position: empty arrays of the right dtypes and widths
        blocks = [
            {k: v[:0] for k, v in encode_positions(torch.zeros(1, vocab), settings, vocab, None).items()}
        ]
    return concat_blocks(blocks) | {"sample_tokens": np.asarray(tokens, dtype=np.uint32)}


def _progress(total: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc="kdkit cache", disable=not enabled, dynamic_ncols=True)
