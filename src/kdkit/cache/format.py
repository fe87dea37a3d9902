"""What a teacher-logit cache stores per token, and how compactly (format version 1).

Three modes, each a fixed set of arrays per shard (numpy, saved as safetensors; never pickle).
Positions are the tokens trained on: position t of a sample predicts its label t+1, and only labels
that are not -100 (completion tokens) are stored, in order, sample after sample.

Every shard holds, per sample: ``sample_tokens`` uint32 [S] (positions stored for the sample) and
``sample_crc`` uint32 [S] (CRC-32 of the sample's token ids and labels: a reader checks the batch it
is given is the data the cache was built from). Then, per mode (n = positions in the shard):

- ``topk``: ``ids`` [n, k] · ``logprobs`` [n, k] float16 · ``tail_logprob`` [n] float16 (if ``tail``):
  k·(w + 2) + 2 bytes per token. With ``values: uint8`` the log-probs are quantised instead:
  ``top_logprob`` [n] float16 (the largest) and ``logprob_codes`` [n, k] uint8 = round(16·(top − log p)),
  clamped to 255: k·(w + 1) + 4 bytes per token (k = 32, SmolLM2: 100 bytes).
- ``sampled``: ``n_unique`` [n] uint8 · ``ids`` [m] · ``counts`` [m] uint8 · ``entropy`` [n] float16;
  when τ ≠ 1 also ``logprobs`` [m] float16 and ``log_z`` [n] float32: 3 + U·(w + 1) bytes per token
  (+ 2U + 4 when τ ≠ 1).
- ``dense``: ``logprobs`` [n, V] float16: 2V bytes per token.

w = id width: 1 byte (uint8) for a vocabulary ≤ 256, 2 (uint16) ≤ 65,536 (SmolLM2's 49,152, GPT-2's
50,257), 3 (uint24, stored as [..., 3] uint8 little-endian) ≤ 16,777,216 (Llama-3's 128,256,
Qwen's 151,936), else 4 (int32). U = unique ids among the N draws of a position (≤ N; a peaked
teacher gives U ≈ 1-3, so random sampling is variable-length: offsets come from ``n_unique``).
Add 8 bytes per *sample* (the two per-sample arrays) and a ~few-hundred-byte header per shard.

Why these precisions: log-probabilities in float16 keep ~3 significant digits (absolute error
≤ 2^-11·|log p|: 0.0005 nats near p = 0.5, 0.008 near p = 1e-7), far below the sampling noise of any
sparse target; the tail and entropy are single numbers per token. Sampling counts are exact
(uint8; N ≤ 255) and with τ = 1 they *are* the importance weights (c/N), so a τ = 1 sampled cache
stores no probabilities at all and stays exactly unbiased. log Z_τ multiplies every weight of a
position, so it is kept in float32. The uint8 top-k option rounds each log-prob to 1/16 nat below
the position's largest (relative error of each probability ≤ ±3.2%; ids more than 15.9 nats below
the top, i.e. under 1.2e-7 of the top probability, are stored as exactly that far below).
Log-probabilities are clamped at `VALUE_FLOOR` before the cast (float16 cannot hold the loss
code's -1e30 floor).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from kdkit.losses.sparse import distribution_entropy, importance_weights, sampled_target, topk_target

FORMAT_VERSION = 1
Mode = Literal["topk", "sampled", "dense"]
#: uint8 top-k log-probs: codes in units of 1/QUANT_SCALE nat below the position's top log-prob.
QUANT_SCALE = 16.0
#: Stored log-probabilities are clamped here (float16's range is ±65504; e^-1e4 is 0 anyway).
VALUE_FLOOR = -1.0e4


@dataclass(frozen=True)
class CacheSettings:
    """How a cache samples and stores the teacher's distribution (part of the manifest).

    mode: "topk" (k most likely ids, with the residual tail mass if `tail`), "sampled" (random-
        sampling KD: `draws` ids from q ∝ p_T^τ with τ = `proposal_temperature`), or "dense" (every
        log-prob; refused above `max_dense_vocab`).
    temperature: the teacher distribution stored is softmax(logits / temperature); training must
        use the same distillation temperature.
    values: how top-k log-probs are stored: float16, or uint8 codes of 1/16 nat below the position's
        top log-prob (one byte less per id; see the module docstring).
    seed: the random draws of shard i come from a generator seeded with (seed, i), so a shard
        recomputed after a crash is identical to the one it replaces.
    samples_per_shard: granularity of atomic writes, resumption and parallel work.
    """

    mode: Mode = "topk"
    k: int = 32
    tail: bool = True
    values: Literal["float16", "uint8"] = "float16"
    draws: int = 12
    proposal_temperature: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    samples_per_shard: int = 256
    max_dense_vocab: int = 4096

    def __post_init__(self) -> None:
        if self.mode not in ("topk", "sampled", "dense"):
            raise ValueError(f"mode must be topk, sampled or dense, got {self.mode!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 1 <= self.draws <= 255:
            raise ValueError(f"draws must be in [1, 255] (counts are stored as uint8), got {self.draws}")
        if not self.proposal_temperature > 0 or not self.temperature > 0:
            raise ValueError("temperature and proposal_temperature must be > 0")
        if self.values not in ("float16", "uint8"):
            raise ValueError(f"values must be float16 or uint8, got {self.values!r}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")

    def stored(self) -> dict[str, Any]:
        """The settings that determine the stored values (the manifest's `settings`)."""
        out = asdict(self)
        if self.mode != "topk":
            out.pop("k"), out.pop("tail"), out.pop("values")
        if self.mode != "sampled":
            out.pop("draws"), out.pop("proposal_temperature")
        if self.mode == "topk":
            out.pop("seed")  # deterministic
        out.pop("max_dense_vocab")
        return out

    def check_vocab(self, vocab_size: int) -> None:
        if self.mode == "dense" and vocab_size > self.max_dense_vocab:
            raise ValueError(
                f"dense caching stores 2·V = {2 * vocab_size:,} bytes per token for this vocabulary of "
                f"{vocab_size:,}; use mode topk or sampled (or raise max_dense_vocab if you mean it)"
            )
        if self.mode == "topk" and self.k > vocab_size:
            raise ValueError(f"k = {self.k} exceeds the vocabulary size {vocab_size}")


# ---------------------------------------------------------------------------------------- id widths


def id_width(vocab_size: int) -> int:
    """Bytes per stored id: 1, 2, 3 (uint24) or 4."""
    for width, limit in ((1, 1 << 8), (2, 1 << 16), (3, 1 << 24)):
        if vocab_size <= limit:
            return width
    return 4


def pack_ids(ids: np.ndarray, width: int) -> np.ndarray:
    """int ids -> the compact array of `width` bytes per id (uint24: an extra trailing dim of 3)."""
    if width == 1:
        return ids.astype(np.uint8)
    if width == 2:
        return ids.astype(np.uint16)
    if width == 3:
        as32 = ids.astype("<u4")
        return as32.view(np.uint8).reshape(*ids.shape, 4)[..., :3].copy()
    return ids.astype(np.int32)


def unpack_ids(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of `pack_ids`: int64 ids."""
    if width == 3:
        padded = np.zeros((*packed.shape[:-1], 4), dtype=np.uint8)
        padded[..., :3] = packed
        return padded.view("<u4")[..., 0].astype(np.int64)
    return packed.astype(np.int64)


def bytes_per_token_formula(settings: CacheSettings, vocab_size: int, unique: float | None = None) -> float:
    """The per-token payload in bytes (the module table), without per-sample and header overhead.

    unique: mean unique ids per position for "sampled" (default: all `draws` distinct, the bound).
    """
    w = id_width(vocab_size)
    if settings.mode == "topk":
        per_id = w + (1 if settings.values == "uint8" else 2)
        return settings.k * per_id + (2 if settings.tail else 0) + (2 if settings.values == "uint8" else 0)
    if settings.mode == "dense":
        return 2.0 * vocab_size
    u = settings.draws if unique is None else unique
    extra = (2 * u + 4) if settings.proposal_temperature != 1.0 else 0
    return 3 + u * (w + 1) + extra


# ---------------------------------------------------------------------------------------- encoding


def _f16(x: torch.Tensor) -> np.ndarray:
    return x.float().clamp_min(VALUE_FLOOR).cpu().numpy().astype(np.float16)


def encode_positions(
    log_p: torch.Tensor,
    settings: CacheSettings,
    vocab_size: int,
    generator: torch.Generator | None,
    memo: dict[str, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """The stored arrays for n positions from the teacher's log-probs [n, V] (already at temperature).

    log_p may live on the teacher's device: the entropy and the top-k selection run there and only
    the kept entries cross to the host ([n, k] instead of [n, V], which on a GPU would otherwise
    bound the writer by the copy and a host-side top-k). "sampled" draws on the host (its
    generator is a CPU one, so a shard's draws do not depend on the device); "dense" copies all.
    generator: the random source of "sampled" (ignored otherwise). memo: a dict shared by the
    encodings of one `log_p` in several modes (the entropy and the host copy are made once into it).
    """
    w = id_width(vocab_size)
    if settings.mode == "dense":
        return {"logprobs": _f16(log_p)}
    memo = {} if memo is None else memo
    if "entropy" not in memo:
        memo["entropy"] = distribution_entropy(log_p)
    shared = {"log_probs": True, "entropy": memo["entropy"]}
    if settings.mode == "topk":
        target = {key: value.cpu() for key, value in topk_target(log_p, settings.k, **shared).items()}
        out = {"ids": pack_ids(target["ids"].numpy(), w)}
        if settings.values == "uint8":
            top = torch.from_numpy(_f16(target["logprobs"][:, 0]).astype(np.float32))  # as it will be read
            codes = ((top[:, None] - target["logprobs"].float()) * QUANT_SCALE).round().clamp(0, 255)
            out |= {
                "top_logprob": top.numpy().astype(np.float16),
                "logprob_codes": codes.numpy().astype(np.uint8),
            }
        else:
            out["logprobs"] = _f16(target["logprobs"])
        if settings.tail:
            out["tail_logprob"] = _f16(target["tail_logprob"])
        return out
    if "host" not in memo:
        memo["host"] = log_p.cpu()
    target = sampled_target(
        memo["host"],
        settings.draws,
        proposal_temperature=settings.proposal_temperature,
        generator=generator,
        log_probs=True,
        entropy=memo["entropy"].cpu(),
    )
    valid = target["counts"] > 0  # [n, N], unique ids left-aligned
    out = {
        "n_unique": valid.sum(-1).numpy().astype(np.uint8),
        "ids": pack_ids(target["ids"][valid].numpy(), w),
        "counts": target["counts"][valid].numpy().astype(np.uint8),
        "entropy": _f16(target["entropy"]),
    }
    if settings.proposal_temperature != 1.0:
        out["logprobs"] = _f16(target["logprobs"][valid])
        out["log_z"] = target["log_z"].float().numpy().astype(np.float32)
    return out


def concat_blocks(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-batch arrays along the position axis (empty blocks allowed)."""
    if not blocks:
        return {}
    return {key: np.concatenate([b[key] for b in blocks], axis=0) for key in blocks[0]}


def decode_positions(
    arrays: dict[str, np.ndarray], settings: CacheSettings, vocab_size: int
) -> dict[str, torch.Tensor]:
    """Stored arrays of n positions -> the sparse target the losses read (torch, float32).

    topk: ids [n, k] long, logprobs [n, k], tail_logprob [n] (if stored).
    sampled: ids [n, U] long (U = max unique ids here; padding id 0), weights [n, U] (0 on padding),
      entropy [n].
    dense: logprobs [n, V].
    """
    w = id_width(vocab_size)
    if settings.mode == "dense":
        return {"logprobs": torch.from_numpy(arrays["logprobs"].astype(np.float32))}
    if settings.mode == "topk":
        if "logprob_codes" in arrays:
            top = arrays["top_logprob"].astype(np.float32)[:, None]
            logprobs = top - arrays["logprob_codes"].astype(np.float32) / QUANT_SCALE
        else:
            logprobs = arrays["logprobs"].astype(np.float32)
        out = {"ids": torch.from_numpy(unpack_ids(arrays["ids"], w)), "logprobs": torch.from_numpy(logprobs)}
        if "tail_logprob" in arrays:
            out["tail_logprob"] = torch.from_numpy(arrays["tail_logprob"].astype(np.float32))
        return out
    n_unique = arrays["n_unique"].astype(np.int64)
    n, width = len(n_unique), int(n_unique.max()) if len(n_unique) else 1
    rows = np.repeat(np.arange(n), n_unique)
    starts = np.cumsum(n_unique) - n_unique
    cols = np.arange(len(rows)) - np.repeat(starts, n_unique)
    ids = np.zeros((n, width), dtype=np.int64)
    counts = np.zeros((n, width), dtype=np.int64)
    ids[rows, cols] = unpack_ids(arrays["ids"], w)
    counts[rows, cols] = arrays["counts"]
    counts_t = torch.from_numpy(counts)
    if settings.proposal_temperature != 1.0:
        logprobs = np.full((n, width), VALUE_FLOOR, dtype=np.float32)
        logprobs[rows, cols] = arrays["logprobs"]
        log_z = torch.from_numpy(arrays["log_z"].astype(np.float32))
        weights = importance_weights(
            counts_t, torch.from_numpy(logprobs), log_z, settings.draws, settings.proposal_temperature
        )
    else:
        weights = importance_weights(counts_t, counts_t.float(), torch.zeros(n), settings.draws, 1.0)
    return {
        "ids": torch.from_numpy(ids),
        "weights": weights,
        "entropy": torch.from_numpy(arrays["entropy"].astype(np.float32)),
    }


#: Arrays indexed by id slot (flat, variable length) rather than by position, per mode.
FLAT_ARRAYS = {"sampled": ("ids", "counts", "logprobs")}
