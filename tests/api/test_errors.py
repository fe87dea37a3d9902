"""Each bad input of kdkit.distill is refused with a clear message before any training starts."""

from __future__ import annotations

import pytest
import torch

import kdkit
from kdkit.config.loading import ConfigError
from kdkit.data.examples import DataError
from tests.api.conftest import FAST, make_student


def refuse(tmp_path, error, match, **kwargs):
    kwargs.setdefault("method", "kd")
    settings = {**FAST, **kwargs.pop("settings", {})}
    with pytest.raises(error, match=match):
        kdkit.distill(output_dir=tmp_path, log=lambda _: None, **kwargs, **settings)
    assert not any(tmp_path.rglob("metrics.jsonl")), "training must not have started"


def test_wrong_input_shape(teacher, tmp_path):
    refuse(tmp_path, DataError, r"the teacher cannot run on the data's inputs \(\[2, 7\]\)",
           teacher=teacher, student=make_student(inputs=7), data=torch.randn(50, 7))


def test_student_cannot_run_on_inputs(teacher, tmp_path):
    refuse(tmp_path, DataError, r"the student cannot run on the data's inputs \(\[2, 12\]\)",
           teacher=teacher, student=make_student(inputs=9), data=torch.randn(50, 12))


def test_student_output_width_differs(teacher, tmp_path):
    refuse(tmp_path, DataError, "the student outputs 3 classes but the teacher 4",
           teacher=teacher, student=make_student(width=3), data=torch.randn(50, 12))


def test_outputs_must_be_logits(teacher, tmp_path):
    refuse(tmp_path, DataError, r"must return logits \[batch, classes\]",
           teacher=teacher, student=torch.nn.Flatten(0), data=torch.randn(50, 12))


def test_label_outside_the_teachers_classes(teacher, tmp_path):
    y = torch.zeros(50, dtype=torch.long)
    y[7] = 4
    refuse(tmp_path, DataError, r"label 4 is outside the teacher's 4 classes \(0..3\); 1 label",
           teacher=teacher, student=make_student(), data=(torch.randn(50, 12), y))


def test_nan_inputs(teacher, tmp_path):
    x = torch.randn(50, 12)
    x[9, 3] = float("nan")
    refuse(tmp_path, DataError, r"1 example\(s\) have NaN or infinite inputs \(first: example 9\)",
           teacher=teacher, student=make_student(), data=(x, torch.zeros(50, dtype=torch.long)))


def test_data_of_different_sizes(teacher, tmp_path):
    refuse(tmp_path, DataError, "data of different sizes: 50 inputs but 40 labels",
           teacher=teacher, student=make_student(),
           data=(torch.randn(50, 12), torch.zeros(40, dtype=torch.long)))


def test_eval_data_checked_too(teacher, tmp_path):
    refuse(tmp_path, DataError, "eval_data: label 9 is outside",
           teacher=teacher, student=make_student(), data=torch.randn(50, 12),
           eval_data=(torch.randn(10, 12), torch.full((10,), 9)))


def test_label_only_objective_on_unlabelled_data(teacher, tmp_path):
    refuse(tmp_path, ValueError, "objective 'ce' needs labels, but the data has none",
           method="scratch", student=make_student(), data=torch.randn(50, 12))
    refuse(tmp_path, ValueError, "objective 'ce' needs labels", method="dkd", teacher=teacher,
           student=make_student(), data=torch.randn(50, 12))


def test_unknown_engine_setting(teacher, tmp_path):
    refuse(tmp_path, ConfigError, r"setting stepz: unknown field \(engine settings: steps, batch_size",
           teacher=teacher, student=make_student(), data=torch.randn(50, 12), settings={"stepz": 3})


def test_bad_engine_value(teacher, tmp_path):
    refuse(tmp_path, ConfigError, "setting lr: Input should be greater than 0",
           teacher=teacher, student=make_student(), data=torch.randn(50, 12), settings={"lr": -1.0})


def test_unknown_method_and_parameter(teacher, tmp_path):
    refuse(tmp_path, ValueError, r"'kdd' is not a classifier method \(known: at, dist", method="kdd",
           teacher=teacher, student=make_student(), data=torch.randn(50, 12))
    refuse(tmp_path, ValueError, r"method .kd. has no parameter .temp. \(its parameters: alpha, .*temp",
           method_params={"temp": 2}, teacher=teacher, student=make_student(), data=torch.randn(50, 12))
    refuse(tmp_path, ValueError, "temperature", method_params={"temperature": -2}, teacher=teacher,
           student=make_student(), data=torch.randn(50, 12))


def test_missing_teacher_for_a_teacher_method(tmp_path):
    refuse(tmp_path, ValueError, "method 'kd' needs a teacher", student=make_student(),
           data=torch.randn(50, 12))


def test_missing_column(teacher, tmp_path):
    from datasets import Dataset

    data = Dataset.from_dict({"x": torch.randn(20, 12).tolist(), "label": [0] * 20})
    refuse(tmp_path, DataError, r"no input column 'features' \(columns: x, label\)", teacher=teacher,
           student=make_student(), data=data, input_column="features")
    refuse(tmp_path, DataError, r"no label column 'y' \(columns: x, label\)", teacher=teacher,
           student=make_student(), data=data, input_column="x", label_column="y")


def test_text_without_a_tokenizer(teacher, tmp_path):
    from datasets import Dataset

    data = Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]})
    refuse(tmp_path, DataError, "column 'text' holds text: pass a tokenizer", teacher=teacher,
           student=make_student(), data=data)


def test_not_data_at_all(teacher, tmp_path):
    refuse(tmp_path, DataError, "cannot use int as data", teacher=teacher, student=make_student(), data=3)
