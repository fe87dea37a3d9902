"""Config loading: YAML, overrides, one-line errors naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kdkit.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    load_yaml,
    parse_run_config,
    validation_message,
)


def test_overrides_set_nested_values_and_list_items() -> None:
    data = {"train": {"lr": 0.1}, "objectives": [{"name": "kd", "weight": 1.0}]}
    overrides = ["train.lr=0.5", "objectives.0.weight=2", "train.new.deep=true", "name=x y"]
    result = apply_overrides(data, overrides)
    assert result["train"]["lr"] == 0.5
    assert result["objectives"][0]["weight"] == 2
    assert result["train"]["new"]["deep"] is True
    assert result["name"] == "x y"
    assert data["train"]["lr"] == 0.1, "the input mapping must not be modified"


@pytest.mark.parametrize("override", ["novalue", "=3", "objectives.5.weight=1", "train.lr.x=1"])
def test_bad_overrides_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError):
        apply_overrides({"train": {"lr": 0.1}, "objectives": [{}]}, [override])


def test_validation_message_is_one_line_naming_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate({"steps": "many"})
    message = validation_message(info.value)
    assert message.startswith("config error at steps:")
    assert "\n" not in message
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate({"stpes": 3})
    assert validation_message(info.value) == "config error at stpes: unknown field"
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate({"optimizer": "adam"})
    assert "optimizer" in validation_message(info.value) and "adamw" in validation_message(info.value)


def test_unknown_or_missing_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="at kind: 'regression' is not a kind of run"):
        parse_run_config({"kind": "regression"})
    with pytest.raises(ConfigError, match="at kind: required field is missing"):
        parse_run_config({})


def test_yaml_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(scalar)
