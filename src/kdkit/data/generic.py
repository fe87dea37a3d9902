"""Hugging Face `datasets` loaders of local files, as a config names them.

```yaml
data:
  format: csv                 # csv | json (.jsonl too) | parquet | text | imagefolder; default: extension
  train: data/rt/train.csv    # a file, a list of files, or (imagefolder) a folder
  eval: data/rt/test.csv
  input_column: text          # default: text / sentence / image / inputs ... when present
  label_column: label         # default: label / labels when present; none = label-free
```

`load_files(format, files, split=...)` returns a `datasets.Dataset`; `check_columns` refuses a missing
column in one line. Text columns are tokenized later (with the teacher's tokenizer by default),
image columns become float tensors through `kdkit.data.examples.default_image_transform`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from kdkit.data.examples import DataError

Format = Literal["csv", "json", "parquet", "text", "imagefolder"]
EXTENSIONS: dict[str, Format] = {
    ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
}


def infer_format(files: str | Path | Sequence[str | Path]) -> Format:
    """The loader of a file list from its extension (a folder means imagefolder)."""
    first = Path(files if isinstance(files, (str, Path)) else files[0])
    if first.is_dir():
        return "imagefolder"
    suffixes = [s for s in first.suffixes if s not in (".gz", ".bz2", ".zst", ".xz")]
    fmt = EXTENSIONS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {first} from its extension; name it (format: csv, json, ...)"
        )
    return fmt


def load_files(
    files: str | Path | Sequence[str | Path], *, format: Format | None = None, split: str = "train",
) -> Any:
    """A `datasets.Dataset` of local files (each must exist); `split` picks one of the builder's splits
    (all files given here form that split). Missing files are refused in one line naming them."""
    paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
    if not paths:
        raise DataError("no data files given")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"data file not found: {missing[0]}{more}")
    fmt = format or infer_format(paths)
    from datasets import load_dataset

    options: dict[str, Any] = {}
    if fmt == "csv" and paths[0].suffix == ".tsv":
        options["delimiter"] = "\t"
    if fmt == "imagefolder":
        return load_dataset("imagefolder", data_dir=str(paths[0]), split=split)
    return load_dataset(fmt, data_files={split: [str(p) for p in paths]}, split=split, **options)


def check_columns(dataset: Any, *columns: str | None, where: str = "data") -> None:
    """DataError naming the first requested column the dataset lacks."""
    names = list(dataset.column_names)
    for column in columns:
        if column is not None and column not in names:
            raise DataError(f"{where}: no column {column!r} (columns: {', '.join(names)})")


__all__ = ["EXTENSIONS", "check_columns", "infer_format", "load_files"]
