"""Turn cached samples into the sparse target of one training batch, checking it is the right data.

A batch from the cache's dataset carries `cache_index` [B] (the sample's position in the dataset
the cache was built from, see `IndexedSamples`). Each row is checked against the cache: its token ids
and labels must have the CRC stored for that sample, and it must have as many trained positions as
the cache stored; a row that differs (other data, another tokenization, a truncation setting
changed) raises `CacheError` instead of training on a misaligned target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kdkit.cache.format import concat_blocks, decode_positions
from kdkit.cache.identity import batch_crcs
from kdkit.cache.reader import CacheReader
from kdkit.cache.store import CacheError
from kdkit.losses.divergences import LOGIT_FLOOR

#: The batch key holding each row's sample index in the cached dataset.
INDEX_KEY = "cache_index"


class IndexedSamples:
    """A dataset view whose dict samples also carry their own index (as `cache_index`).

    The LM collator passes integer fields through as a [B] tensor, so batches know which cached
    samples they hold, whatever order the engine's sampler draws them in.
    """

    def __init__(self, samples: Sequence[dict[str, Any]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.samples[index], INDEX_KEY: int(index)}


class IndexedCollate:
    """Wrap a collate function so that batches of `IndexedSamples` carry `cache_index` [B] long.

    The index is taken off each sample before the wrapped collate sees it (collators that keep only
    known keys would drop it; those that pass integers through would see it twice).
    """

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        indices = [int(s[INDEX_KEY]) for s in samples]
        batch = self.collate([{k: v for k, v in s.items() if k != INDEX_KEY} for s in samples])
        batch[INDEX_KEY] = torch.tensor(indices, dtype=torch.long)
        return batch


def batch_target(reader: CacheReader, batch: dict[str, Any]) -> dict[str, Tensor]:
    """The cached target of every trained position of `batch`, over shifted positions [B, T-1].

    batch: input_ids, attention_mask, labels [B, T] and `cache_index` [B].
    Returns (masked-out positions hold padding: id 0, log-prob LOGIT_FLOOR, weight 0):
      topk: ids [B, T-1, k] long, logprobs [B, T-1, k], tail_logprob [B, T-1] (if stored);
      sampled: ids [B, T-1, U] long, weights [B, T-1, U], entropy [B, T-1];
      dense: logprobs [B, T-1, V].
    Raises CacheError when the batch has no `cache_index` or a row is not the cached sample.
    """
    if INDEX_KEY not in batch:
        raise CacheError(
            "the batch has no 'cache_index': training from a logit cache needs the dataset the cache was "
            "built from, wrapped in kdkit.cache.IndexedSamples (the LM pipeline does this), and the "
            "'dataset' sampler (generated sequences are not in the cache)"
        )
    labels = batch["labels"]
    mask = labels[:, 1:] != -100  # [B, T-1]
    counts = mask.sum(1).tolist()
    crcs = batch_crcs({k: batch[k] for k in ("input_ids", "labels", "attention_mask")})
    rows = []
    per_position = _PER_POSITION[reader.settings.mode]
    for r, index in enumerate(batch[INDEX_KEY].tolist()):
        arrays, crc = reader.sample(int(index))
        if crc != crcs[r]:
            raise CacheError(
                f"batch row {r} (sample {index}) is not the sample the cache stored: its tokens or labels "
                "differ (other data, tokenizer or truncation than when the cache was built); rebuild the "
                "cache with `kdkit cache CONFIG` for this data"
            )
        stored = len(arrays[per_position])
        if stored != counts[r]:
            raise CacheError(
                f"sample {index} has {counts[r]} trained positions but the cache stored {stored}"
            )
        rows.append(arrays)
    # one decode for the whole batch: rows are concatenated in the order of the mask's True positions
    decoded = decode_positions(concat_blocks(rows), reader.settings, reader.vocab_size)
    return _assemble(decoded, mask)


#: An array with one entry per stored position, per mode (counts positions of a sample).
_PER_POSITION = {"topk": "ids", "sampled": "n_unique", "dense": "logprobs"}


def _assemble(decoded: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
    """Scatter per-position targets [n, ...] (n = mask.sum()) into [B, T-1, ...] padded tensors."""
    out: dict[str, Tensor] = {}
    cpu_mask = mask.cpu()
    for key, value in decoded.items():
        if key == "entropy":
            fill = 0.0
        elif key in ("logprobs", "tail_logprob"):
            fill = LOGIT_FLOOR
        else:
            fill = 0
        full = torch.full((*mask.shape, *value.shape[1:]), fill, dtype=value.dtype)
        full[cpu_mask] = value
        out[key] = full.to(mask.device)
    return out
