"""`kind: lm` run configs: validation errors name the field; method parameters are checked at load."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kdkit.config import load_run_config, parse_run_config, validation_message
from kdkit.config.lm import LMRunConfig, LMStudentRun
from kdkit.specs import methods_of_kind

StudentRun = LMStudentRun

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def base(**changes) -> dict:
    data = {
        "kind": "lm",
        "student": {"keep_layers": "every_k:3"},
        "data": {"dataset": "python_docs"},
        "students": [{"name": "fkl", "method": "supervised_kd"}, {"name": "gkd", "method": "gkd"}],
    }
    data.update(changes)
    return data


def error_of(data: dict) -> str:
    with pytest.raises(ValidationError) as caught:
        parse_run_config(data)
    return validation_message(caught.value)


def test_kind_lm_resolves_to_lm_run_config():
    cfg = parse_run_config(base())
    assert isinstance(cfg, LMRunConfig)
    student = cfg.students[1]
    assert cfg.teacher.source == "smollm2"
    assert student.method_class().parts(student.method_params()).sampler == "mixture"


def test_unknown_method_names_the_field_and_the_known_methods():
    message = error_of(
        base(students=[{"name": "a", "method": "supervised_kd"}, {"name": "b", "method": "gdk"}])
    )
    assert message.startswith(
        "config error at students.1.method: 'gdk' is not a language-model method (known: "
    )
    for name in ("supervised_kd", "gkd", "on_policy", "seqkd"):
        assert name in message


def test_classifier_method_is_not_an_lm_method():
    message = error_of(base(students=[{"name": "a", "method": "kd"}]))
    assert "students.0.method: 'kd' is not a language-model method" in message


@pytest.mark.parametrize(
    ("student", "location", "text"),
    [
        ({"name": "a", "method": "gkd", "lmbdaa": 0.3}, "students.0.lmbdaa", "'lmbdaa' is not a parameter"),
        ({"name": "a", "method": "gkd", "bta": 0.5}, "students.0.bta", "'bta' is not a parameter"),
        ({"name": "a", "method": "gkd", "beta": 1.5}, "students.0.beta", "beta=1.5 is outside [0, 1]"),
        ({"name": "a", "method": "gkd", "lmbda": "half"}, "students.0.lmbda", "valid number"),
        ({"name": "a", "method": "gkd", "lmbda": 1.5}, "students.0.lmbda", "less than or equal to 1"),
        (
            {"name": "a", "method": "gkd", "divergence": "rkll"},
            "students.0.divergence",
            "'rkll' is not a divergence",
        ),
        (
            {"name": "a", "method": "supervised_kd", "alpha": 0.3},
            "students.0.alpha",
            "'alpha' is not a parameter",
        ),
        (
            {"name": "a", "method": "gkd", "divergence": "skl", "alpha": 0.3, "beta": 0.2},
            "students.0.beta",
            "'beta'",
        ),
        (
            {"name": "a", "method": "sampled_token", "fused": True},
            "students.0.fused",
            "'fused' is not a parameter",
        ),
        ({"name": "a b", "method": "gkd"}, "students.0.name", "pattern"),
        ({"name": "a", "method": "supervised_kd", "kd_weight": 0.0}, "students.0", "nothing to train"),
    ],
)
def test_student_errors_name_the_field(student, location, text):
    message = error_of(base(students=[student]))
    assert message.startswith(f"config error at {location}:"), message
    assert text in message


@pytest.mark.parametrize(
    ("changes", "location", "text"),
    [
        ({"trian": {}}, "trian", "unknown field"),
        ({"train": {"steps": "many"}}, "train.steps", "valid integer"),
        ({"data": {"dataset": "wiki"}}, "data.dataset", "Input should be"),
        ({"data": {"dataset": "jsonl"}}, "data", "needs a path"),
        ({"data": {"dataset": "python_docs", "prompt_tokens": 200}}, "data", "must be < block_size"),
        ({"student": {}}, "student", "exactly one of keep_layers"),
        ({"student": {"path": "x", "keep_layers": 2}}, "student", "exactly one of keep_layers"),
        (
            {"teacher": {"source": "arithmetic", "arithmetic": {"layers": 2}}},
            "teacher.arithmetic.layers",
            "unknown",
        ),
        ({"teacher": {"dtype": "fp8"}}, "teacher.dtype", "Input should be"),
        ({"students": []}, "students", "at least 1"),
    ],
)
def test_run_errors_name_the_field(changes, location, text):
    message = error_of(base(**changes))
    assert message.startswith(f"config error at {location}:"), message
    assert text in message


def test_duplicate_student_names_are_refused():
    message = error_of(base(students=[{"name": "a", "method": "gkd"}, {"name": "a", "method": "seqkd"}]))
    assert "repeated: a" in message


def test_generating_students_need_prompts():
    message = error_of(base(data={"dataset": "python_docs", "prompt_tokens": 0}))
    assert "['gkd']" in message and "prompt_tokens" in message
    parse_run_config(
        base(
            data={"dataset": "python_docs", "prompt_tokens": 0},
            students=[{"name": "f", "method": "supervised_kd"}],
        )
    )


def test_parameters_override_method_defaults_and_keep_the_temperatures_apart():
    student = StudentRun(name="g", method="gkd", lmbda=1.0, sampling_temperature=0.7, temperature=2.0)
    params = student.method_params()
    assert (params.lmbda, params.sampling_temperature, params.temperature) == (1.0, 0.7, 2.0)
    assert params.divergence == "jsd" and params.divergence_params == {"beta": 0.5}  # declared default
    # another divergence brings its own parameters and defaults (gkd's beta belongs to jsd)
    assert StudentRun(name="g", method="gkd", divergence="rkl").method_params().divergence_params == {}
    skew = StudentRun(name="g", method="gkd", divergence="skl", alpha=0.3).method_params()
    assert skew.divergence_params == {"alpha": 0.3}
    scratch = StudentRun(name="s", method="supervised_kd", kd_weight=0.0, ce_weight=1.0)
    assert not scratch.needs_teacher() and not scratch.generates()
    assert StudentRun(name="g", method="gkd").generates()
    assert not StudentRun(name="g", method="gkd", lmbda=0.0).generates()


def test_round_trip_through_json_keeps_the_parameters():
    cfg = parse_run_config(base(students=[{"name": "g", "method": "gkd", "beta": 0.3}]))
    again = LMRunConfig.model_validate_json(cfg.model_dump_json())
    assert again.students[0].method_params() == cfg.students[0].method_params()
    assert again.students[0].method_params().divergence_params == {"beta": 0.3}


def test_lm_methods_are_listed():
    assert {"gkd", "on_policy", "supervised_kd", "seqkd", "sampled_token", "minillm"} <= set(
        methods_of_kind("lm")
    )


@pytest.mark.parametrize("name", ["smollm2-python-docs-cpu", "smollm2-python-docs", "arithmetic-policies"])
def test_shipped_recipes_validate(name):
    cfg = load_run_config(RECIPES / f"{name}.yaml")
    assert isinstance(cfg, LMRunConfig) and cfg.name == name
    for student in cfg.students:
        params = student.method_params()
        assert params.kd_weight > 0 or params.ce_weight > 0
