"""Padding token-id rows into batch tensors (`IGNORE_INDEX` is defined in `kdkit.losses.tokens`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, value: int | None = None) -> torch.Tensor:
    """[B, max_len] long tensor, rows left-aligned; filler is `value` (default `pad_id`)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_id if value is None else value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, max_len], attention_mask [B, max_len]) with rows right-aligned for generation."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask
