"""The Fashion-MNIST loader on a tiny fake IDX dataset: parsing, splits, caching, and the error path."""

import gzip
import struct
from pathlib import Path

import pytest
import torch

from kdkit.data import fashion_mnist as fm


def _write_idx(path: Path, array: torch.Tensor, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + array.to(torch.uint8).numpy().tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _fake_dataset(root: Path, n_train: int = 50, n_test: int = 20, compress: bool = True) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=generator, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        image_name, label_name = fm.FILES[split]
        _write_idx(root / image_name, images, compress)
        _write_idx(root / label_name, labels, compress)
        data[split] = (images, labels)
    return data


@pytest.fixture
def no_default_copies(monkeypatch, kdkit_cache, tmp_path):
    """Hide the system copy and the environment variable, so only what a test provides exists."""
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.delenv(fm.ENV_VAR, raising=False)


def test_read_idx_round_trips_shape_and_values(tmp_path):
    array = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    _write_idx(tmp_path / "x", array, compress=False)
    assert torch.equal(fm.read_idx(tmp_path / "x"), array)


def test_read_idx_rejects_truncated_file(tmp_path):
    array = torch.zeros(2, 3, dtype=torch.uint8)
    _write_idx(tmp_path / "x", array, compress=False)
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        fm.read_idx(tmp_path / "x")


def test_loader_normalises_and_returns_dict_samples(tmp_path, no_default_copies):
    data = _fake_dataset(tmp_path / "fm")
    train = fm.load_fashion_mnist("train", tmp_path / "fm")
    assert len(train) == 50
    sample = train[3]
    assert set(sample) == {"inputs", "labels"}
    assert sample["inputs"].shape == (1, 28, 28) and sample["inputs"].dtype == torch.float32
    assert sample["labels"].dtype == torch.int64 and int(sample["labels"]) == 3
    expected = (data["train"][0][3].float() / 255 - fm.MEAN) / fm.STD
    assert torch.allclose(sample["inputs"][0], expected)


def test_uncompressed_files_and_env_var_are_found(tmp_path, monkeypatch, no_default_copies):
    _fake_dataset(tmp_path / "plain", compress=False)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "plain"))
    assert len(fm.load_fashion_mnist("test")) == 20


def test_validation_split_is_disjoint_and_deterministic(tmp_path, no_default_copies):
    _fake_dataset(tmp_path / "fm")
    train = fm.load_fashion_mnist("train", tmp_path / "fm", val_size=10)
    val = fm.load_fashion_mnist("val", tmp_path / "fm", val_size=10)
    again = fm.load_fashion_mnist("val", tmp_path / "fm", val_size=10)
    assert len(train) == 40 and len(val) == 10
    assert torch.equal(val.inputs, again.inputs)
    flat = lambda d: {tuple(x.flatten()[:40].tolist()) for x in d.inputs}
    assert not flat(train) & flat(val)


def test_subset_is_a_deterministic_sample(tmp_path, no_default_copies):
    _fake_dataset(tmp_path / "fm")
    a = fm.load_fashion_mnist("train", tmp_path / "fm", subset=7)
    b = fm.load_fashion_mnist("train", tmp_path / "fm", subset=7)
    assert len(a) == 7 and torch.equal(a.labels, b.labels) and torch.equal(a.inputs, b.inputs)


def test_decoded_tensors_are_cached_as_safetensors(tmp_path, no_default_copies, kdkit_cache):
    _fake_dataset(tmp_path / "fm")
    first = fm.load_fashion_mnist("train", tmp_path / "fm")
    cached = list((kdkit_cache / "data" / "fashion-mnist").glob("train-*.safetensors"))
    assert len(cached) == 1
    second = fm.load_fashion_mnist("train", tmp_path / "fm")
    assert torch.equal(first.inputs, second.inputs)


def test_missing_data_without_download_says_how_to_get_it(no_default_copies):
    with pytest.raises(fm.FashionMNISTNotFound, match="apt-get install dataset-fashion-mnist") as error:
        fm.load_fashion_mnist("train", download=False)
    assert fm.ENV_VAR in str(error.value)


def test_failed_download_is_reported_with_instructions(monkeypatch, no_default_copies):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(fm.urllib.request, "urlopen", offline)
    with pytest.raises(fm.FashionMNISTNotFound, match="network unreachable.*apt-get install"):
        fm.load_fashion_mnist("test")


def test_explicit_root_without_files_is_an_error(tmp_path):
    with pytest.raises(fm.FashionMNISTNotFound, match="not found in"):
        fm.load_fashion_mnist("train", tmp_path / "empty")


def test_bad_arguments_are_rejected(tmp_path, no_default_copies):
    _fake_dataset(tmp_path / "fm")
    with pytest.raises(ValueError, match="val_size"):
        fm.load_fashion_mnist("val", tmp_path / "fm")
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("dev", tmp_path / "fm")  # type: ignore[arg-type]


@pytest.mark.skipif(not fm.SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_data_has_the_documented_sizes(kdkit_cache):
    train, test = fm.load_fashion_mnist("train"), fm.load_fashion_mnist("test")
    assert len(train) == 60_000 and len(test) == 10_000
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert abs(float(train.inputs.mean())) < 0.01 and abs(float(train.inputs.std()) - 1) < 0.01
