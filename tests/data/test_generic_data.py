"""Local files through Hugging Face datasets: every format, named columns, one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from kdkit.data.examples import NO_LABEL, DataError, as_examples, default_image_transform
from kdkit.data.generic import check_columns, infer_format, load_files


@pytest.fixture
def rows():
    return [{"text": f"review number {i}", "label": i % 2} for i in range(6)]


def test_csv_json_jsonl_parquet_give_the_same_rows(tmp_path, rows):
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.json", "d.jsonl", "d.parquet"):
        data = load_files(tmp_path / name)
        assert data["text"] == [r["text"] for r in rows], name
        assert data["label"] == [r["label"] for r in rows], name


def test_text_files_are_label_free(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    data = load_files([tmp_path / "a.txt"])
    assert infer_format(tmp_path / "a.txt") == "text"
    def tokenizer(texts, **_):
        return {"input_ids": [[1] * len(t.split()) for t in texts]}

    examples = as_examples(data, tokenizer=tokenizer)
    assert len(examples) == 2 and not examples.has_labels
    assert examples.labels.tolist() == [NO_LABEL, NO_LABEL]


def test_imagefolder_with_standard_transform(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (10, 8), color=(255 * i, 0, 128)).save(tmp_path / label / f"{i}.png")
    data = load_files(tmp_path)
    transform = default_image_transform(size=6, mean=[0.5] * 3, std=[0.5] * 3)
    examples = as_examples(data, image_transform=transform)
    assert examples.inputs.shape == (4, 3, 6, 6)
    assert sorted(examples.labels.tolist()) == [0, 0, 1, 1]
    assert torch.allclose(examples.inputs[:, 2], torch.full((4, 6, 6), (128 / 255 - 0.5) / 0.5), atol=1e-6)


def test_missing_file_and_column_are_refused_in_one_line(tmp_path, rows):
    with pytest.raises(DataError, match=f"data file not found: {tmp_path / 'nope.csv'}$"):
        load_files(tmp_path / "nope.csv")
    (tmp_path / "d.csv").write_text("text,label\nok,1\n")
    data = load_files(tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"data.train: no column 'sentence' \(columns: text, label\)"):
        check_columns(data, "sentence", where="data.train")
    with pytest.raises(DataError, match="cannot tell the format"):
        infer_format(tmp_path / "d.xyz")
