"""The command line: malformed configs are refused with one line and exit code 2, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdkit.cli import main

VALID = {
    "kind": "classifier",
    "name": "cli-test",
    "teacher": {"arch": "cnn", "params": {"width": 4}},
    "student": {"arch": "cnn", "params": {"width": 2}},
    "students": [{"name": "kd", "method": "kd"}],
    "train": {"steps": 5, "batch_size": 8},
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"trian": {"steps": 3}}, "trian"),  # unknown field
        ({"train": {"steps": "many"}}, "train.steps"),  # wrong type
        ({"students": [{"name": "kd", "objectives": [{"name": "kdd"}]}]}, "students.0.objectives.0"),
        ({"students": [{"name": "kd", "method": "kdd"}]}, "students.0.method"),
        ({"kind": "regression"}, "kind"),
    ],
)
def test_malformed_config_gives_one_line_and_exit_2(tmp_path, capsys, change, field) -> None:
    config = _write(tmp_path, VALID | change)
    code = main(["run", str(config), f"output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kdkit: config error at " + field), err
    assert not (tmp_path / "runs").exists(), "nothing may run before the config is valid"


def test_unknown_objective_lists_the_valid_names(tmp_path, capsys) -> None:
    bad = VALID | {"students": [{"name": "kd", "objectives": [{"name": "kdd"}]}]}
    assert main(["run", str(_write(tmp_path, bad))]) == 2
    err = capsys.readouterr().err
    assert "'kdd' is not an objective" in err and "dkd" in err


def test_bad_override_is_refused(tmp_path, capsys) -> None:
    assert main(["run", str(_write(tmp_path, VALID)), "train.lr=-1"]) == 2
    assert "config error at train.lr" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path) -> None:
    config = _write(tmp_path, VALID | {"trian": {}})
    result = subprocess.run(
        [sys.executable, "-m", "kdkit.cli", "run", str(config)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "kdkit: config error at trian: unknown field"


def test_methods_lists_every_registry(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("methods:", "objectives:", "divergences:", "dkd", "fitnet", "jsd", "gkd"):
        assert name in out
