"""Fashion-MNIST (60k train / 10k test, 28×28 greyscale, 10 classes) as a dataset of dict samples.

Where the files come from, first found wins: an explicit `root`, `$KDKIT_FASHION_MNIST`, the
Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), the kdkit cache
folder; if none has them, the canonical Zalando files are downloaded into the cache folder.
Decoded tensors are cached as safetensors so later loads skip the gzip/IDX parsing (~1 s vs ~0.1 s).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from kdkit.paths import cache_dir

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Per-pixel mean and std of the training images (after scaling to [0, 1]).
MEAN, STD = 0.2860, 0.3530
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "KDKIT_FASHION_MNIST"
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The validation split is carved from train with this fixed permutation seed, so "train" and
# "val" never overlap and are the same on every machine.
_SPLIT_SEED = 20170825

Split = Literal["train", "val", "test"]


class FashionMNISTNotFound(FileNotFoundError):
    """No copy of the data was found and none could be downloaded; the message says how to get it."""


class TensorClassificationDataset(Dataset):
    """Images and labels held as two tensors; samples are `{"inputs": [C,H,W] float, "labels": int64}`.

    `inputs` [N, C, H, W] float32 (already normalised), `labels` [N] int64. The whole tensors are
    public so evaluation can batch by slicing instead of going through a DataLoader.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...] = CLASS_NAMES):
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
        self.inputs = inputs
        self.labels = labels
        self.classes = classes

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs[index], "labels": self.labels[index]}


def load_fashion_mnist(
    split: Split = "train",
    root: str | Path | None = None,
    *,
    val_size: int = 0,
    subset: int | None = None,
    download: bool = True,
) -> TensorClassificationDataset:
    """Fashion-MNIST `split` as a dataset of `{"inputs": [1,28,28] float32, "labels": int64}`.

    `inputs` are scaled to [0, 1] then normalised with the training mean/std (≈ zero mean, unit
    variance). `val_size` > 0 holds out that many training examples (a fixed permutation) as
    "val"; "train" then excludes them. `subset` keeps a deterministic random sample of that many
    examples (for quick tests). Raises `FashionMNISTNotFound` with instructions if no data is found.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if split == "val" and val_size <= 0:
        raise ValueError("split='val' needs val_size > 0 (the number of training examples to hold out)")
    images, labels = _decoded("test" if split == "test" else "train", root, download)
    if split != "test" and val_size > 0:
        if val_size >= labels.shape[0]:
            raise ValueError(f"val_size={val_size} leaves no training examples (train has {labels.shape[0]})")
        order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(_SPLIT_SEED))
        keep = order[:val_size] if split == "val" else order[val_size:]
        keep = keep.sort().values  # keep the original order: reproducible and cache-friendly
        images, labels = images[keep], labels[keep]
    if subset is not None and subset < labels.shape[0]:
        if subset <= 0:
            raise ValueError(f"subset must be positive, got {subset}")
        pick = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(_SPLIT_SEED + 1))
        keep = pick[:subset].sort().values
        images, labels = images[keep], labels[keep]
    inputs = (images.float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
    return TensorClassificationDataset(inputs, labels.long())


def find_fashion_mnist(root: str | Path | None = None, *, download: bool = True) -> Path:
    """The folder holding the four IDX files (gzipped or not), searched in the documented order.

    An explicit `root` that lacks the files is an error (not a fallback), so a typo is not hidden
    by a silent switch to another copy.
    """
    if root is not None:
        root = Path(root).expanduser()
        if _has_files(root):
            return root
        raise FashionMNISTNotFound(f"Fashion-MNIST files not found in {root} (expected {_expected_names()})")
    candidates = [Path(os.environ[ENV_VAR]).expanduser()] if os.environ.get(ENV_VAR) else []
    candidates += [SYSTEM_DIR, cache_dir("data", "fashion-mnist")]
    for candidate in candidates:
        if _has_files(candidate):
            return candidate
    target = cache_dir("data", "fashion-mnist")
    if download:
        try:
            _download(target)
            return target
        except OSError as error:
            reason = f"download from {DOWNLOAD_URL} failed ({error})"
    else:
        reason = "downloading is disabled"
    raise FashionMNISTNotFound(
        f"Fashion-MNIST not found (looked in: {', '.join(str(c) for c in candidates)}) and {reason}. "
        f"Install it with `apt-get install dataset-fashion-mnist`, or set ${ENV_VAR} to a folder "
        f"holding {_expected_names()}."
    )


def read_idx(path: str | Path) -> torch.Tensor:
    """Parse one IDX file (optionally gzipped) into a uint8 tensor of its stated shape.

    IDX: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then each
    dimension as a big-endian int32, then the data in C order.
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported (type code {raw[2]:#x})")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    expected = 1
    for size in shape:
        expected *= size
    data = raw[4 + 4 * ndim :]
    if len(data) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(data)} bytes follow")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)


def _decoded(which: str, root: str | Path | None, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N,28,28] and labels [N] for "train" or "test", via the safetensors cache."""
    folder = find_fashion_mnist(root, download=download)
    sources = [_file(folder, name) for name in FILES[which]]
    # Key the decoded cache by the source files' identity so a different copy (e.g. a test's fake
    # data) never reads another copy's cached tensors.
    key = hashlib.sha256(
        "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources).encode()
    ).hexdigest()[:16]
    cached = cache_dir("data", "fashion-mnist") / f"{which}-{key}.safetensors"
    if cached.is_file():
        tensors = load_file(str(cached))
        return tensors["images"], tensors["labels"]
    images, labels = read_idx(sources[0]), read_idx(sources[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{folder}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match"
        )
    partial = cached.with_suffix(".tmp")
    save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(partial))
    partial.replace(cached)  # atomic: a crash never leaves a half-written cache behind
    return images, labels


def _file(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise FashionMNISTNotFound(f"{folder} lacks {name}(.gz)")


def _has_files(folder: Path) -> bool:
    names = [name for pair in FILES.values() for name in pair]
    return folder.is_dir() and all((folder / f"{n}.gz").is_file() or (folder / n).is_file() for n in names)


def _expected_names() -> str:
    return ", ".join(f"{name}.gz" for pair in FILES.values() for name in pair)


def _download(target: Path) -> None:
    for pair in FILES.values():
        for name in pair:
            destination = target / f"{name}.gz"
            if destination.is_file():
                continue
            partial = destination.with_suffix(".part")
            with urllib.request.urlopen(DOWNLOAD_URL + f"{name}.gz", timeout=30) as response:
                partial.write_bytes(response.read())
            partial.replace(destination)


__all__ = [
    "CLASS_NAMES",
    "FashionMNISTNotFound",
    "TensorClassificationDataset",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]
