"""ClassifierRunConfig: defaults, recipe expansion, and errors that name the field."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from kdkit.config import validation_message
from kdkit.config.classifier import ClassifierRunConfig
from kdkit.config.loading import apply_overrides, load_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _config(**changes) -> dict:
    data = {
        "kind": "classifier",
        "name": "t",
        "students": [{"name": "kd", "method": "kd"}],
    }
    data.update(changes)
    return data


def _error(data: dict) -> tuple[tuple, str]:
    with pytest.raises(ValidationError) as error:
        ClassifierRunConfig.model_validate(data)
    return error.value.errors()[0]["loc"], validation_message(error.value)


def test_minimal_config_gets_defaults():
    cfg = ClassifierRunConfig.model_validate(_config())
    assert cfg.kind == "classifier" and cfg.teacher.arch == "cnn" and cfg.student.arch == "cnn"
    assert [(o.name, o.weight) for o in cfg.students[0].resolved_objectives()] == [
        ("ce", pytest.approx(0.1)),
        ("kd", 0.9),
    ]


def test_unknown_objective_name_is_located_and_lists_known_names():
    loc, message = _error(_config(students=[{"name": "s", "objectives": [{"name": "kdd"}]}]))
    assert loc == ("students", 0, "objectives", 0, "name")
    assert "'kdd' is not an objective (known: " in message and "dkd" in message
    assert message.startswith("config error at students.0.objectives.0.name:")


def test_unknown_objective_field_is_located():
    loc, message = _error(_config(students=[{"name": "s", "objectives": [{"name": "dkd", "temprature": 2}]}]))
    assert loc == ("students", 0, "objectives", 0, "temprature")
    assert message == "config error at students.0.objectives.0.temprature: unknown field"
    # params with nested divergence parameters name the key and what is allowed
    _, message = _error(_config(students=[{"name": "s", "objectives": [{"name": "kd", "temprature": 2}]}]))
    assert "'temprature' is not a parameter here (allowed: divergence, t2_scaling, temperature)" in message


def test_method_parameters_are_checked_at_load():
    loc, message = _error(_config(students=[{"name": "s", "method": "kd", "alpha": 1.5}]))
    assert loc == ("students", 0, "alpha") and "less than or equal to 1" in message
    _, message = _error(_config(students=[{"name": "s", "method": "kd", "divergence": "jsd", "bta": 0.5}]))
    assert "'bta' is not a parameter here" in message and "beta" in message
    _, message = _error(_config(students=[{"name": "s", "method": "kd", "divergence": "jsd", "beta": 1.5}]))
    assert "beta=1.5 is outside [0, 1]" in message
    _, message = _error(_config(students=[{"name": "s", "method": "gkd"}]))
    assert "'gkd' is not a classifier method" in message


def test_wrong_type_is_located():
    loc, _ = _error(_config(students=[{"name": "s", "objectives": [{"name": "dkd", "beta": "lots"}]}]))
    assert loc == ("students", 0, "objectives", 0, "beta")
    loc, _ = _error(_config(train={"steps": "many"}))
    assert loc == ("train", "steps")


def test_unknown_top_level_field_and_method_and_arch():
    loc, message = _error(_config(studnets=[]))
    assert loc == ("studnets",) and "unknown field" in message
    loc, message = _error(_config(students=[{"name": "s", "method": "kdd"}]))
    assert loc == ("students", 0, "method") and "not a" in message and "scratch" in message
    loc, message = _error(_config(student={"arch": "resnet"}))
    assert loc == ("student", "arch") and "'resnet' is not a vision model" in message
    loc, message = _error(_config(student={"arch": "cnn", "params": {"widht": 3}}))
    assert loc == ("student",) and "'widht'" in message and "width" in message


def test_student_needs_method_or_objectives_and_unique_names():
    _, message = _error(_config(students=[{"name": "s"}]))
    assert "needs a method or a list of objectives" in message
    _, message = _error(_config(students=[{"name": "a", "method": "kd"}, {"name": "a", "method": "dkd"}]))
    assert "repeated: a" in message


def test_method_entries_are_updated_by_objectives_of_the_same_name():
    cfg = ClassifierRunConfig.model_validate(
        _config(students=[{"name": "s", "method": "kd", "objectives": [{"name": "kd", "temperature": 2}]}])
    )
    ce, kd = cfg.students[0].resolved_objectives()
    assert kd.params().temperature == 2 and kd.weight == 0.9 and ce.weight == pytest.approx(0.1)


def test_teacher_key_ignores_logging_but_not_learning_settings():
    teacher = lambda **train: {"arch": "cnn", "params": {"width": 8}, "train": {"steps": 50, **train}}
    base = ClassifierRunConfig.model_validate(_config(teacher=teacher()))
    quieter = ClassifierRunConfig.model_validate(_config(teacher=teacher(progress=False, log_every=7)))
    longer = ClassifierRunConfig.model_validate(_config(teacher=teacher(steps=5)))
    assert base.teacher_key() == quieter.teacher_key() != longer.teacher_key()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    data = load_yaml(path)
    if data.get("kind") != "classifier":
        pytest.skip("not a classifier config")
    cfg = ClassifierRunConfig.model_validate(apply_overrides(data, ["train.steps=3"]))
    assert cfg.train.steps == 3
    for student in cfg.students:
        assert student.resolved_objectives()
