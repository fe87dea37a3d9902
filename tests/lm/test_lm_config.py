"""`kind: lm` run configs: validation errors name the field; method overrides resolve to recipes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from kdkit.config import load_run_config, parse_run_config, validation_message
from kdkit.config.lm import LMRunConfig, StudentRun, lm_method_names
from kdkit.methods.lm import LMRecipe

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
    assert cfg.teacher.source == "smollm2" and cfg.students[1].recipe().sampler == "mixture"


def test_unknown_method_names_the_field_and_the_known_methods():
    message = error_of(
        base(students=[{"name": "a", "method": "supervised_kd"}, {"name": "b", "method": "gdk"}])
    )
    assert message.startswith("config error at students.1.method: 'gdk' is not a method (known: ")
    for name in ("supervised_kd", "gkd", "on_policy", "seqkd"):
        assert name in message


def test_classifier_method_is_not_an_lm_method():
    import kdkit.methods.classifier  # noqa: F401  registers "kd", "dkd", ...

    message = error_of(base(students=[{"name": "a", "method": "kd"}]))
    assert "students.0.method: 'kd' is not a language-model method" in message


@pytest.mark.parametrize(
    ("student", "location", "text"),
    [
        ({"name": "a", "method": "gkd", "lmbdaa": 0.3}, "students.0.lmbdaa", "unknown field"),
        ({"name": "a", "method": "gkd", "lmbda": "half"}, "students.0.lmbda", "valid number"),
        ({"name": "a", "method": "gkd", "lmbda": 1.5}, "students.0.lmbda", "less than or equal to 1"),
        (
            {"name": "a", "method": "gkd", "divergence": "rkll"},
            "students.0.divergence",
            "'rkll' is not a divergence",
        ),
        ({"name": "a", "method": "gkd", "sampler": "teachr"}, "students.0.sampler", "Input should be"),
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
        ({"teacher": {"source": "arithmetic", "arithmetic": {"layers": 2}}}, "teacher", "'layers'"),
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


def test_overrides_replace_recipe_fields_and_keep_the_temperatures_apart():
    student = StudentRun(name="g", method="gkd", lmbda=1.0, sampling_temperature=0.7, temperature=2.0)
    recipe = student.recipe()
    assert (recipe.lmbda, recipe.sampling_temperature, recipe.temperature) == (1.0, 0.7, 2.0)
    assert recipe.divergence == "jsd" and recipe.divergence_kwargs == {"beta": 0.5}  # method defaults kept
    # a new divergence drops the method's kwargs (gkd's beta belongs to jsd)
    assert StudentRun(name="g", method="gkd", divergence="rkl").recipe().divergence_kwargs == {}
    scratch = StudentRun(name="s", method="supervised_kd", kd_weight=0.0, ce_weight=1.0)
    assert not scratch.needs_teacher() and not scratch.generates()
    assert StudentRun(name="g", method="gkd").generates()
    assert not StudentRun(name="g", method="gkd", lmbda=0.0).generates()


def test_round_trip_through_json_keeps_the_recipe():
    cfg = parse_run_config(base())
    again = LMRunConfig.model_validate_json(cfg.model_dump_json())
    assert again.students[1].recipe() == cfg.students[1].recipe()


def test_every_recipe_field_can_be_overridden():
    """StudentRun lists LMRecipe's fields explicitly (typed, named errors): keep them in step."""
    recipe_fields = {f.name for f in dataclasses.fields(LMRecipe)}
    assert recipe_fields <= set(StudentRun.model_fields)
    assert {"gkd", "on_policy", "supervised_kd"} <= set(lm_method_names())


@pytest.mark.parametrize("name", ["smollm2-python-docs-cpu", "smollm2-python-docs", "arithmetic-policies"])
def test_shipped_recipes_validate(name):
    cfg = load_run_config(RECIPES / f"{name}.yaml")
    assert isinstance(cfg, LMRunConfig) and cfg.name == name
    for student in cfg.students:
        recipe = student.recipe()
        assert recipe.kd_weight > 0 or recipe.ce_weight > 0
