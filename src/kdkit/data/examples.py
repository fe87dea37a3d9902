"""Whatever data a user hands `kdkit.distill`, as one in-memory table of examples.

Accepted: a pair of tensors `(X, y)`; inputs alone `X` (label-free); a torch `Dataset` of
`(input, label)` pairs, of inputs alone, or of dicts; a Hugging Face `datasets.Dataset` (text
columns are tokenized, image columns transformed, numeric columns stacked). Everything becomes an
`Examples`: `inputs` is a tensor [N, ...] or a dict of per-example tensors (token ids of varying
length, padded per batch by `collate`), `labels` is [N] int64 with `NO_LABEL` (-100) where an
example has none. Holding the table in memory lets kdkit check every example before training
(NaN, labels out of range) and cache a frozen teacher's logits by example index.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

NO_LABEL = -100
LABEL_KEYS = ("labels", "label", "y", "target")
INPUT_KEYS = ("inputs", "input", "x", "pixel_values", "image", "img")
TEXT_INPUT_KEYS = ("text", "sentence", "review", "content")


class DataError(ValueError):
    """Data kdkit cannot train on; the message names the problem (checked before training)."""


@dataclass
class Examples(Dataset):
    """N examples in memory. inputs: Tensor [N, ...] or {name: list of N tensors}; labels: [N] int64
    (NO_LABEL = unlabelled); teacher_logits: [N, C] float32 once cached. Items are dicts
    {"inputs", "labels", "index"} (+ "teacher_logits")."""

    inputs: Tensor | dict[str, list[Tensor]]
    labels: Tensor
    pad_values: Mapping[str, int] | None = None  # per dict key, for padding variable-length tensors
    teacher_logits: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        sizes = {k: len(v) for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else {
            "inputs": int(self.inputs.shape[0])}
        wrong = {k: s for k, s in sizes.items() if s != n}
        if wrong:
            raise DataError(
                f"data of different sizes: {n} labels but "
                + ", ".join(f"{s} {k}" for k, s in wrong.items())
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(self.inputs, dict):
            inputs: Any = {k: v[index] for k, v in self.inputs.items()}
        else:
            inputs = self.inputs[index]
        item = {"inputs": inputs, "labels": self.labels[index], "index": torch.tensor(index)}
        if self.teacher_logits is not None:
            item["teacher_logits"] = self.teacher_logits[index]
        return item

    @property
    def has_labels(self) -> bool:
        return bool((self.labels != NO_LABEL).any())

    @property
    def labelled(self) -> int:
        return int((self.labels != NO_LABEL).sum())

    def take(self, indices: Sequence[int]) -> Examples:
        """A sub-table of the given example indices (teacher logits kept)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if isinstance(self.inputs, dict):
            inputs: Any = {k: [v[i] for i in index.tolist()] for k, v in self.inputs.items()}
        else:
            inputs = self.inputs[index]
        logits = self.teacher_logits[index] if self.teacher_logits is not None else None
        return Examples(inputs, self.labels[index], self.pad_values, logits)

    def batch(self, indices: Sequence[int]) -> Tensor | dict[str, Tensor]:
        """The collated inputs of some examples (e.g. a probe batch)."""
        return collate([self[i] for i in indices], self.pad_values)["inputs"]

    def check_finite(self) -> None:
        """DataError naming the first example whose float inputs hold NaN or ±inf."""
        tensors = self.inputs.items() if isinstance(self.inputs, dict) else [("inputs", self.inputs)]
        for name, value in tensors:
            if isinstance(value, Tensor):
                if value.is_floating_point():
                    bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(dim=1)
                    if bad.any():
                        first = int(bad.nonzero()[0])
                        raise DataError(
                            f"{int(bad.sum())} example(s) have NaN or infinite {name} "
                            f"(first: example {first})"
                        )
                continue
            for i, item in enumerate(value):
                if item.is_floating_point() and not torch.isfinite(item).all():
                    raise DataError(f"example {i} has NaN or infinite {name}")


def collate(samples: list[dict[str, Any]], pad_values: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Stack samples into a batch; 1-D tensors of different lengths in a dict input are right-padded
    (with `pad_values[key]`, default 0), so a batch of token ids is as long as its longest example."""
    batch: dict[str, Any] = {}
    first = samples[0]
    for key in first:
        values = [s[key] for s in samples]
        if isinstance(first[key], dict):
            batch[key] = {
                name: _pad_stack([v[name] for v in values], (pad_values or {}).get(name, 0))
                for name in first[key]
            }
        else:
            batch[key] = torch.stack([torch.as_tensor(v) for v in values])
    return batch


def _pad_stack(values: list[Tensor], pad: int) -> Tensor:
    if values[0].ndim == 1 and len({v.shape[0] for v in values}) > 1:
        return torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pad)
    return torch.stack(values)


# ----------------------------------------------------------------------------------------------
# From what users hand in


def _labels_tensor(labels: Any, n: int) -> Tensor:
    if labels is None:
        return torch.full((n,), NO_LABEL, dtype=torch.long)
    tensor = torch.as_tensor(labels)
    if tensor.is_floating_point():
        if not torch.isfinite(tensor).all():
            raise DataError("labels hold NaN or infinite values")
        if not torch.equal(tensor, tensor.round()):
            raise DataError("labels must be integer class indices (got fractional values)")
    if tensor.ndim != 1:
        raise DataError(f"labels must be one class index per example, shape [N]; got {tuple(tensor.shape)}")
    return tensor.long()


def from_tensors(inputs: Tensor, labels: Any = None) -> Examples:
    """`(X, y)` or `X` alone: X [N, ...] (one example per row), y [N] class indices."""
    if not isinstance(inputs, Tensor):
        inputs = torch.as_tensor(inputs)
    if inputs.ndim == 0:
        raise DataError("inputs must have a leading example dimension, got a scalar")
    if labels is not None and len(labels) != inputs.shape[0]:
        raise DataError(f"data of different sizes: {inputs.shape[0]} inputs but {len(labels)} labels")
    return Examples(inputs, _labels_tensor(labels, inputs.shape[0]))


def from_torch_dataset(
    dataset: Dataset, *, input_key: str | None = None, label_key: str | None = None
) -> Examples:
    """A map-style torch Dataset of `(input, label)`, of inputs alone, or of dicts."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("the dataset is empty")
    items = [dataset[i] for i in range(n)]
    first = items[0]
    if isinstance(first, Mapping):
        label_key = label_key or next((k for k in LABEL_KEYS if k in first), None)
        if label_key is not None and label_key not in first:
            raise DataError(f"the dataset's samples have no {label_key!r} key (keys: {', '.join(first)})")
        labels = [item[label_key] for item in items] if label_key else None
        key = input_key or next((k for k in INPUT_KEYS if k in first), None)
        if key is not None:
            if key not in first:
                raise DataError(f"the dataset's samples have no {key!r} key (keys: {', '.join(first)})")
            return from_tensors(_stack([item[key] for item in items], key), labels)
        # no single input key: every other tensor key is a keyword input (input_ids, attention_mask)
        names = [k for k in first if k != label_key]
        inputs = {k: [torch.as_tensor(item[k]) for item in items] for k in names}
        return Examples(inputs, _labels_tensor(labels, n))
    if isinstance(first, (tuple, list)):
        if len(first) != 2:
            raise DataError(f"dataset samples must be (input, label) pairs; got {len(first)} items")
        return from_tensors(_stack([x for x, _ in items], "inputs"), [int(y) for _, y in items])
    return from_tensors(_stack(items, "inputs"))


def _stack(values: list[Any], name: str) -> Tensor:
    tensors = [torch.as_tensor(v) for v in values]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise DataError(f"{name} have different shapes ({', '.join(map(str, sorted(shapes)[:3]))}, ...)")
    return torch.stack(tensors)


def from_hf_dataset(
    dataset: Any,
    *,
    input_column: str | None = None,
    label_column: str | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
    image_transform: Callable[[Any], Tensor] | None = None,
) -> Examples:
    """A Hugging Face `datasets.Dataset`. The input column is `input_column`, else the first of
    text/sentence/..., image/img/pixel_values/..., inputs/x present. Text is tokenized with
    `tokenizer` (truncated to `max_length` tokens, padded per batch later); images go through
    `image_transform` (default: `default_image_transform`). `label_column` (default "label"/"labels"
    when present) must hold integer classes; without it the data is label-free."""
    columns = list(dataset.column_names)
    if len(dataset) == 0:
        raise DataError("the dataset is empty")
    if input_column is None:
        input_column = next((c for c in (*TEXT_INPUT_KEYS, *INPUT_KEYS) if c in columns), None)
        if input_column is None:
            raise DataError(f"name the input column (input_column=...); columns: {', '.join(columns)}")
    elif input_column not in columns:
        raise DataError(f"no input column {input_column!r} (columns: {', '.join(columns)})")
    if label_column is None:
        label_column = next((c for c in LABEL_KEYS if c in columns), None)
    elif label_column not in columns:
        raise DataError(f"no label column {label_column!r} (columns: {', '.join(columns)})")
    labels = dataset[label_column] if label_column else None
    if labels is not None and any(v is None for v in labels):
        labels = [NO_LABEL if v is None else v for v in labels]
    values = dataset[input_column]
    first = values[0]
    if isinstance(first, str):
        if tokenizer is None:
            raise DataError(
                f"column {input_column!r} holds text: pass a tokenizer (or a Hugging Face teacher)"
            )
        encoded = tokenizer(list(values), truncation=True, max_length=max_length)
        names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        inputs = {k: [torch.tensor(v, dtype=torch.long) for v in encoded[k]] for k in names}
        pad = {"input_ids": getattr(tokenizer, "pad_token_id", None) or 0}
        return Examples(inputs, _labels_tensor(labels, len(values)), pad)
    if hasattr(first, "convert"):  # a PIL image
        transform = image_transform or default_image_transform()
        return from_tensors(torch.stack([transform(image) for image in values]), labels)
    return from_tensors(_stack(list(values), input_column), labels)


def default_image_transform(size: int | None = None, mean: Sequence[float] | None = None,
                            std: Sequence[float] | None = None) -> Callable[[Any], Tensor]:
    """PIL image -> float tensor [C, H, W] in [0, 1] (optionally resized to size×size, then
    normalised with per-channel mean/std). Greyscale stays 1 channel; other modes become RGB."""

    def transform(image: Any) -> Tensor:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        if size is not None:
            image = image.resize((size, size))
        raw = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        channels = 1 if image.mode == "L" else 3
        tensor = raw.reshape(image.height, image.width, channels).permute(2, 0, 1).float() / 255.0
        if mean is not None and std is not None:
            tensor = (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        return tensor

    return transform


def as_examples(data: Any, **options: Any) -> Examples:
    """Any accepted form of data as `Examples` (see the module docstring). options: input_column /
    label_column (dict and HF data), tokenizer, max_length, image_transform (HF data)."""
    if isinstance(data, Examples):
        return data
    if isinstance(data, Tensor):
        return from_tensors(data)
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], (str, bytes)):
        return from_tensors(torch.as_tensor(data[0]) if not isinstance(data[0], Tensor) else data[0], data[1])
    if type(data).__module__.startswith("datasets.") and hasattr(data, "column_names"):
        return from_hf_dataset(data, **{k: v for k, v in options.items() if v is not None})
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return from_torch_dataset(
            data, input_key=options.get("input_column"), label_key=options.get("label_column")
        )
    raise DataError(
        f"cannot use {type(data).__name__} as data: pass (X, y) tensors, X alone, a torch Dataset, "
        "or a datasets.Dataset"
    )


__all__ = [
    "NO_LABEL",
    "DataError",
    "Examples",
    "as_examples",
    "collate",
    "default_image_transform",
    "from_hf_dataset",
    "from_tensors",
    "from_torch_dataset",
]
