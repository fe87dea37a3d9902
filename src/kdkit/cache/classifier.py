"""Durable teacher-logit cache for classifier runs whose training inputs repeat every epoch.

A KD student whose teacher runs on every batch costs several times a scratch student. When the
training inputs are the same every epoch (no random augmentation) the teacher's logits of each
example can be computed once, stored, and read back: `cached_teacher_logits` runs the teacher over
the dataset once (eval mode, batched), stores the logits in float32 (exactly what the live teacher
gives, 4·C bytes per example: 40 B for 10 classes) as one safetensors file with a manifest holding
the teacher's weight fingerprint, the data fingerprint and a SHA-256 of the file, and returns them.
A later run with the same teacher and data reads the file (checksum verified); another teacher or
other data get their own file (the folder name is derived from both); a damaged file is reported
and recomputed. `WithTeacherLogits` adds each example's logits to its dict sample as
`teacher_logits`, which the classifier distiller uses instead of running the teacher.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.numpy
import torch
from torch import Tensor, nn

from kdkit.cache.identity import teacher_identity
from kdkit.cache.store import atomic_write, file_sha256, serialize
from kdkit.paths import cache_dir

#: The batch key the classifier distiller reads cached logits from.
LOGITS_KEY = "teacher_logits"


def inputs_fingerprint(dataset: Any, batch_size: int = 4096) -> str:
    """SHA-256 over every example's `inputs` tensor (dtype, shape, bytes), in order."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    for index in range(len(dataset)):
        x = dataset[index]["inputs"]
        x = x.detach().cpu().contiguous()
        digest.update(f"{x.dtype}|{tuple(x.shape)}".encode())
        digest.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def cached_teacher_logits(
    teacher: nn.Module,
    dataset: Any,
    *,
    root: str | Path | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Tensor, dict[str, Any]]:
    """The teacher's logits [N, C] (float32) of every example of `dataset`, computed at most once.

    dataset: dict samples with "inputs" (e.g. `TensorClassificationDataset`); must give the same
        inputs on every access (no random augmentation).
    root: the cache folder; default `cache_dir("logits", "classifier-<teacher>-<data>")`.
    Returns (logits, info) with info = {"path", "hit" (read from disk), "seconds" (teacher time, 0 on
    a hit), "bytes"}.
    """
    import time

    teacher_id = teacher_identity(teacher)
    data_fp = inputs_fingerprint(dataset)
    if root is None:
        root = cache_dir("logits", f"classifier-{teacher_id['weights_sha256'][:12]}-{data_fp[:12]}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path, manifest_path = root / "logits.safetensors", root / "manifest.json"
    expected = {"teacher": teacher_id["weights_sha256"], "data": data_fp, "examples": len(dataset)}
    if manifest_path.exists() and path.exists():
        manifest = json.loads(manifest_path.read_text())
        same = all(manifest.get(k) == v for k, v in expected.items())
        if same and file_sha256(path) == manifest.get("sha256"):
            logits = torch.from_numpy(safetensors.numpy.load_file(str(path))["logits"])
            return logits, {"path": str(path), "hit": True, "seconds": 0.0, "bytes": path.stat().st_size}
        reason = "another teacher or data" if not same else "checksum mismatch (damaged file)"
        log(f"kdkit: classifier logit cache at {root} is unusable ({reason}); recomputing it")
    started = time.perf_counter()
    was_training = teacher.training
    teacher.eval()
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    parts = []
    try:
        for start in range(0, len(dataset), batch_size):
            inputs = torch.stack(
                [dataset[i]["inputs"] for i in range(start, min(start + batch_size, len(dataset)))]
            )
            parts.append(teacher(inputs.to(device)).float().cpu())
    finally:
        teacher.train(was_training)
    logits = torch.cat(parts)
    seconds = time.perf_counter() - started
    payload = serialize({"logits": logits.numpy()}, {"teacher": expected["teacher"], "data": data_fp})
    atomic_write(path, payload)
    manifest = expected | {"sha256": hashlib.sha256(payload).hexdigest(), "classes": int(logits.shape[1])}
    atomic_write(manifest_path, json.dumps(manifest, indent=2).encode())
    return logits, {"path": str(path), "hit": False, "seconds": seconds, "bytes": len(payload)}


class WithTeacherLogits:
    """A dataset view adding the cached `teacher_logits` [C] to each dict sample."""

    def __init__(self, dataset: Any, logits: Tensor) -> None:
        if len(dataset) != len(logits):
            raise ValueError(f"{len(logits)} cached logits for a dataset of {len(dataset)} examples")
        self.dataset, self.logits = dataset, logits

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], LOGITS_KEY: self.logits[index]}

    def __getattr__(self, name: str) -> Any:  # e.g. .classes of the wrapped dataset
        if name in ("dataset", "logits"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
