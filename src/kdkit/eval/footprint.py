"""What a model costs to keep and to run: parameters, size on disk, latency. Works for any nn.Module."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import Tensor, nn


def count_parameters(model: nn.Module) -> int:
    """Number of parameters; tied (shared) tensors are counted once."""
    return sum(p.numel() for p in model.parameters())


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's state dict (parameters and buffers) saved as one safetensors file.

    `save_model` drops tied duplicates and makes views contiguous, as a real export would.
    """
    with tempfile.TemporaryDirectory(prefix="kdkit-footprint-") as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


def model_footprint(model: nn.Module) -> dict[str, int]:
    """{"parameters": count, "size_on_disk_bytes": safetensors file size in bytes}."""
    return {"parameters": count_parameters(model), "size_on_disk_bytes": size_on_disk(model)}


def _batch_size(batch: Tensor | Mapping[str, Any]) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    for value in batch.values():
        if isinstance(value, Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ValueError("measure_latency: the example batch holds no tensor with a batch dimension")


def _to_device(batch: Tensor | Mapping[str, Any], device: torch.device) -> Tensor | dict[str, Any]:
    if isinstance(batch, Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    example_batch: Tensor | Mapping[str, Any],
    *,
    repeats: int = 30,
    warmup: int = 5,
) -> dict[str, float | int]:
    """Wall-clock time of one forward pass on `example_batch`, in milliseconds.

    example_batch: a tensor [B, ...] passed as `model(x)`, or a dict passed as `model(**batch)`
    (e.g. input_ids/attention_mask for a Hugging Face model); it is moved to the model's device.
    Runs `warmup` untimed passes (allocator and kernel selection), then `repeats` timed ones in
    eval mode under no_grad. The median resists the outliers of a machine shared with other work.
    Returns latency_ms_median, latency_ms_p90, latency_ms_per_example (median / B), batch_size,
    repeats and threads (torch intra-op threads, which latency on a CPU depends on).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    device = _model_device(model)
    batch = _to_device(example_batch, device)
    run = (lambda: model(**batch)) if isinstance(batch, dict) else (lambda: model(batch))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            run()
        sync()
        times_ms = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            sync()  # CUDA launches are asynchronous: wait for the work, not just the launch
            times_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    median = statistics.median(times_ms)
    ordered = sorted(times_ms)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    batch_size = _batch_size(example_batch)
    return {
        "latency_ms_median": median,
        "latency_ms_p90": p90,
        "latency_ms_per_example": median / batch_size,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
