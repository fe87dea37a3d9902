"""`kdkit limit` end to end on a tiny saved BERT and a small text file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import BertConfig, BertModel, BertTokenizerFast

from kdkit.cli import main
from kdkit.diagnostics.limit import read_texts


def _tiny_folder(tmp_path: Path) -> Path:
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *["good", "bad", "film", "plot", "actor", "dull", "great", "fun", "slow"],
    ]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    folder = tmp_path / "teacher"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def test_limit_writes_json_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _tiny_folder(tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(["good film great fun", "bad plot dull actor", "slow film", "fun actor"] * 20))
    out = tmp_path / "limit"
    code = main(
        [
            "limit",
            str(folder),
            "--texts",
            str(texts),
            "--widths",
            "2",
            "8",
            "16",
            "--out",
            str(out),
            "--steps",
            "40",
            "--dictionary-size",
            "32",
        ]
    )
    assert code == 0
    summary = json.loads((out / "limit.json").read_text())
    assert summary["teacher_width"] == 16 and [r["width"] for r in summary["rows"]] == [2.0, 8.0, 16.0]
    assert summary["tokens"] == sum(len(t.split()) + 2 for t in texts.read_text().splitlines())
    assert (out / "limit.png").read_bytes()[:4] == b"\x89PNG"
    assert "critical width" in capsys.readouterr().out


def test_read_texts_formats_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("text,label\nhello,1\n,0\nworld,0\n")
    assert read_texts(tmp_path / "a.csv") == ["hello", "world"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert read_texts(tmp_path / "b.jsonl", limit=1) == ["x"]
    (tmp_path / "c.csv").write_text("body\nhi\n")
    with pytest.raises(ValueError, match="no 'text' column"):
        read_texts(tmp_path / "c.csv")
    with pytest.raises(FileNotFoundError):
        read_texts(tmp_path / "missing.txt")
