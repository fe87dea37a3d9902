"""`kdkit limit`: predict how narrow a student of a Hugging Face teacher can be, before training one.

    kdkit limit MODEL_DIR --texts corpus.txt --widths 64 128 256 384 --layer -1 --out limit/

Reads the texts (a .txt file with one text per line, or a .csv/.jsonl with a "text" field),
collects the teacher layer's hidden states at every real token, trains a sparse autoencoder on
them, and writes limit.json (F, α, g(α), d*, per-width floors, SAE quality), limit.md (a table)
and limit.png (floor vs width) into the output folder. See `kdkit.diagnostics.width`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kdkit.diagnostics.width import WidthPrediction, collect_activations, plot_floor, predict_width


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts from a .txt (one per line), .csv or .jsonl (a "text" column/field) file; blanks skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"texts file {path} does not exist")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if "text" not in (reader.fieldnames or []):
                raise ValueError(f"{path} has no 'text' column (columns: {reader.fieldnames})")
            texts = [row["text"] for row in reader]
    elif path.suffix == ".jsonl":
        texts = [
            json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    else:
        texts = path.read_text(encoding="utf-8").splitlines()
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts[:limit] if limit else texts


def _batches(
    tokenizer: Any, texts: Sequence[str], size: int, max_length: int
) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(texts), size):
        yield dict(
            tokenizer(
                list(texts[start : start + size]),
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
        )


def run_limit(
    model: str | Path,
    texts: str | Path,
    widths: Sequence[int],
    *,
    out: str | Path = "limit",
    layer: int = -1,
    max_tokens: int = 20_000,
    max_length: int = 128,
    dictionary_size: int | None = None,
    l1: float | str = "auto",
    steps: int = 3000,
    seed: int = 0,
    per_dimension: bool = True,
) -> WidthPrediction:
    """Load the teacher (`AutoModel.from_pretrained(model)`) and its tokenizer, predict the floors
    for `widths` from `layer`'s activations over `texts`, write limit.json/.md/.png into `out`.
    per_dimension: scale each activation dimension to unit variance before the SAE (transformer
    residual streams have outlier dimensions that otherwise take the SAE's whole budget)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher = AutoModel.from_pretrained(str(model)).eval()
    corpus = read_texts(texts)
    activations = collect_activations(
        teacher, _batches(tokenizer, corpus, 32, max_length), layer=layer, max_tokens=max_tokens
    )
    prediction = predict_width(
        activations, widths, dictionary_size=dictionary_size, l1=l1, steps=steps, seed=seed,
        per_dimension=per_dimension,
    )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    summary = prediction.as_dict() | {
        "model": str(model),
        "layer": layer,
        "tokens": int(activations.shape[0]),
        "texts": str(texts),
        "per_dimension": per_dimension,
    }
    (folder / "limit.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# Minimum-width prediction for {model} (layer {layer})",
        "",
        f"{activations.shape[0]} tokens; SAE: {prediction.sae['dictionary_size']} entries, "
        f"l1 {prediction.sae['l1']:g}, explained variance {prediction.sae['explained_variance']:.3f}, "
        f"L0 {prediction.sae['l0']:.1f}"
        f"{' (each dimension standardised)' if per_dimension else ''}.",
        f"F = {prediction.num_features} live features, α = {prediction.alpha:.4f}, g(α) = "
        f"{prediction.capacity_per_dim:.2f}, critical width d* = {prediction.critical_width:.1f} "
        f"(teacher width {prediction.teacher_width}).",
        "",
        prediction.table(),
        *[f"\nwarning: {w}" for w in prediction.warnings],
    ]
    (folder / "limit.md").write_text("\n".join(lines) + "\n")
    plot_floor(prediction, folder / "limit.png", title=f"{Path(str(model)).name}, layer {layer}")
    return prediction


__all__ = ["read_texts", "run_limit"]
