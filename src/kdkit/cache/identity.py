"""Fingerprints that make a cache refuse to train the wrong run: teacher weights, tokenizer, data.

- teacher: SHA-256 over every tensor of the state dict (name, dtype, shape, bytes) and of the model
  config; the same weights loaded from another folder give the same fingerprint, the same folder
  loaded in another dtype does not (its logits differ).
- tokenizer: SHA-256 of the vocabulary (token -> id) and the special tokens.
- data: CRC-32 of each sample's token ids and labels as the collate function produces them, and a
  SHA-256 over those CRCs (and the sample count). The per-sample CRCs are also stored in the shards so
  that a training batch is checked row by row against the sample it claims to be.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def teacher_identity(model: nn.Module) -> dict[str, Any]:
    """{"weights_sha256", "config_sha256", "parameters", "info": {...}} of a torch / HF model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    for key in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        config_dict.pop(key, None)  # descriptive, or already in the weights' dtypes
    return {
        "weights_sha256": digest.hexdigest(),
        "config_sha256": hashlib.sha256(
            json.dumps(config_dict, sort_keys=True, default=str).encode()
        ).hexdigest(),
        "info": {
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "name_or_path": getattr(config, "_name_or_path", "") if config is not None else "",
        },
    }


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """{"sha256", "vocab_size", "info"} of a Hugging Face tokenizer (vocabulary + special tokens)."""
    vocab = tokenizer.get_vocab()
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    blob = json.dumps({"vocab": sorted(vocab.items(), key=lambda kv: kv[1]), "special": special}).encode()
    return {
        "sha256": hashlib.sha256(blob).hexdigest(),
        "vocab_size": len(vocab),
        "info": {"class": type(tokenizer).__name__},
    }


def row_crc(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """CRC-32 of one batch row's real tokens (attention mask 1) and their labels, padding excluded.

    input_ids, labels, attention_mask: [T]. The same sample gives the same CRC however it is padded.
    """
    keep = attention_mask.bool()
    ids = input_ids[keep].to(torch.int64).numpy().astype("<i8")
    lab = labels[keep].to(torch.int64).numpy().astype("<i8")
    return zlib.crc32(lab.tobytes(), zlib.crc32(ids.tobytes()))


def batch_crcs(batch: dict[str, torch.Tensor]) -> list[int]:
    """`row_crc` of every row of an LM batch (input_ids, labels, attention_mask [B, T])."""
    ids = batch["input_ids"].cpu().to(torch.int64).numpy().astype("<i8")
    labels = batch["labels"].cpu().to(torch.int64).numpy().astype("<i8")
    keep = batch["attention_mask"].cpu().numpy().astype(bool)
    return [
        zlib.crc32(labels[r][keep[r]].tobytes(), zlib.crc32(ids[r][keep[r]].tobytes()))
        for r in range(ids.shape[0])
    ]


def sample_crcs(
    samples: Sequence[Any], collate: Callable[[list[Any]], dict[str, torch.Tensor]], batch_size: int = 256
) -> np.ndarray:
    """uint32 [N]: the CRC of every sample as `collate` turns it into token ids and labels."""
    out: list[int] = []
    for start in range(0, len(samples), batch_size):
        out.extend(
            batch_crcs(collate([samples[i] for i in range(start, min(start + batch_size, len(samples)))]))
        )
    return np.asarray(out, dtype=np.uint32)


def data_identity(crcs: np.ndarray) -> dict[str, Any]:
    """{"fingerprint", "samples"}: SHA-256 over the per-sample CRCs, in order."""
    return {
        "fingerprint": hashlib.sha256(crcs.astype("<u4").tobytes()).hexdigest(),
        "samples": int(len(crcs)),
    }
