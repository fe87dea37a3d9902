"""Label-scarce classifier runs: a few labelled training images, the rest an unlabelled transfer set.

`split_labels(train_set, teacher, labelled, seed)` keeps the labels of `labelled` images (a seeded
draw) and caches the frozen teacher's logits for every image once. `LabelScarce.distiller` then
gives each student the data its objectives can use: methods that need labels in every term
(scratch, dkd) train on the labelled images alone; methods with a label-free term (kd, dist) train
on all images, their label terms averaged over the labelled examples of each batch, reading the
cached teacher logits instead of running the teacher on every batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdkit.data.examples import NO_LABEL, Examples
from kdkit.data.fashion_mnist import TensorClassificationDataset
from kdkit.methods.any_model import AnyModelDistiller, needs_labels
from kdkit.methods.classifier_distiller import ClassifierDistiller
from kdkit.objectives.classifier import ObjectiveSpec


@dataclass
class LabelScarce:
    """labelled: the labelled images alone; mixed: every image, labels NO_LABEL where unknown,
    with the teacher's logits [N, C] cached."""

    labelled: TensorClassificationDataset
    mixed: Examples

    def distiller(
        self, student: nn.Module, teacher: nn.Module | None, objectives: Sequence[ObjectiveSpec]
    ) -> tuple[Any, nn.Module]:
        """(training set, distiller) for one student."""
        if all(needs_labels(spec.name) for spec in objectives):
            return self.labelled, ClassifierDistiller(student, teacher, objectives, self.labelled.inputs[:2])
        return self.mixed, AnyModelDistiller(student, teacher, objectives, self.mixed.inputs[:2])


@torch.no_grad()
def split_labels(
    train_set: TensorClassificationDataset, teacher: nn.Module, labelled: int, seed: int,
    *, log: Callable[[str], None] = print, batch_size: int = 1000, cache: Path | None = None,
) -> LabelScarce:
    """cache: a safetensors file for the teacher's logits on these images (read if it matches the
    data's size, else computed and written) — a warm run then skips the teacher entirely."""
    n = len(train_set)
    if labelled >= n:
        raise ValueError(f"data.labelled={labelled} leaves no unlabelled images (the training split has {n})")
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed))[:labelled].sort().values
    labels = torch.full_like(train_set.labels, NO_LABEL)
    labels[keep] = train_set.labels[keep]
    started = time.perf_counter()
    logits = load_file(str(cache))["logits"] if cache is not None and cache.is_file() else None
    if logits is not None and logits.shape[0] == n:
        how = f"read from {cache}"
    else:
        was_training = teacher.training
        teacher.eval()
        logits = torch.cat([teacher(train_set.inputs[i:i + batch_size]).float()
                            for i in range(0, n, batch_size)])
        teacher.train(was_training)
        how = f"computed in {time.perf_counter() - started:.1f} s"
        if cache is not None:
            partial = cache.with_suffix(".tmp")
            save_file({"logits": logits.contiguous()}, str(partial))
            partial.replace(cache)
    log(f"kdkit: label-scarce run: {labelled:,} labelled of {n:,} training images; teacher logits of "
        f"all images {how}")
    few = TensorClassificationDataset(train_set.inputs[keep], train_set.labels[keep], train_set.classes)
    return LabelScarce(few, Examples(train_set.inputs, labels, teacher_logits=logits))


__all__ = ["LabelScarce", "split_labels"]
