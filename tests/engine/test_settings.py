"""The engine's settings live with the engine: it never imports `kdkit.config`, and the config
package re-exports the same objects so existing imports keep working."""

import ast
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
    from kdkit.config.train import TrainConfig as ConfigTrainConfig
    from kdkit.engine import TrainConfig as EngineTrainConfig
    from kdkit.engine.settings import TrainConfig as SettingsTrainConfig

    assert ConfigError is LoadingConfigError is settings.ConfigError
    assert StrictModel is settings.StrictModel
    assert TrainConfig is ConfigTrainConfig is EngineTrainConfig is SettingsTrainConfig
    assert issubclass(TrainConfig, settings.StrictModel) and issubclass(ConfigError, ValueError)
