"""The engine's settings live with the engine: it never imports `kdkit.config`, and the config
package re-exports the same objects so existing imports keep working."""

import ast
import subprocess
import sys
from pathlib import Path

import kdkit.engine

ENGINE = Path(kdkit.engine.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_engine_does_not_import_config():
    offenders = {
        path.name: sorted(m for m in imported_modules(path) if m.split(".")[:2] == ["kdkit", "config"])
        for path in ENGINE.glob("*.py")
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_config_re_exports_the_same_objects():
    from kdkit import settings
    from kdkit.config import ConfigError, StrictModel, TrainConfig
    from kdkit.config.loading import ConfigError as LoadingConfigError
    from kdkit.config.loading import StrictModel as LoadingStrictModel
    from kdkit.config.train import TrainConfig as ConfigTrainConfig
    from kdkit.engine import TrainConfig as EngineTrainConfig
    from kdkit.engine.settings import TrainConfig as SettingsTrainConfig

    assert ConfigError is LoadingConfigError is settings.ConfigError
    assert StrictModel is LoadingStrictModel is settings.StrictModel
    assert TrainConfig is ConfigTrainConfig is EngineTrainConfig is SettingsTrainConfig
    assert issubclass(TrainConfig, settings.StrictModel) and issubclass(ConfigError, ValueError)


def test_validating_a_config_does_not_import_torch():
    code = "import sys, kdkit.config; kdkit.config.TrainConfig(steps=3); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
