"""Small image classifiers for teachers and students, built by name from a config.

Every model takes `[B, C, H, W]` float images and returns `[B, num_classes]` logits, and names its
parts so feature methods can hook them by module name: a CNN has `stage1`, `stage2`, … (each
conv → BN → ReLU blocks followed by 2×2 max-pooling), `pool` and `classifier`; an MLP has
`hidden1`, `hidden2`, … and `classifier`. `kdkit methods` lists the architectures.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kdkit.registry import Registry

VISION_MODELS: Registry[Callable[..., nn.Module]] = Registry("vision model")


@VISION_MODELS.register("cnn", "conv-BN-ReLU stages (width doubles per stage, 2×2 max-pool) + linear head")
class ConvNet(nn.Module):
    """Stages of 3×3 conv-BN-ReLU blocks, each stage ending in 2×2 max-pooling, then a linear head.

    Stage i has `width · 2^(i-1)` channels. With 28×28 inputs and 3 stages the feature maps are
    [B, w, 14, 14], [B, 2w, 7, 7], [B, 4w, 3, 3]; `pool` averages the last to [B, 4w], or, with
    `global_pool=False`, flattens it (keeps where things are: learns faster, more parameters).
    """

    def __init__(
        self,
        width: int = 32,
        stages: int = 3,
        convs_per_stage: int = 1,
        hidden: int = 0,
        dropout: float = 0.0,
        global_pool: bool = True,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        if width < 1 or stages < 1 or convs_per_stage < 1:
            raise ValueError(
                f"width, stages and convs_per_stage must be ≥ 1, got {width}, {stages}, {convs_per_stage}"
            )
        channels = in_channels
        for index in range(stages):
            out = width * 2**index
            blocks: list[nn.Module] = []
            for _ in range(convs_per_stage):
                blocks += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
            blocks.append(nn.MaxPool2d(2))
            self.add_module(f"stage{index + 1}", nn.Sequential(*blocks))
            image_size //= 2
        self.stages = stages
        if global_pool:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            self.pool = nn.Flatten()
            channels *= image_size * image_size
        head: list[nn.Module] = []
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        if hidden > 0:
            head += [nn.Linear(channels, hidden), nn.ReLU()]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
            channels = hidden
        head.append(nn.Linear(channels, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        for index in range(self.stages):
            x = getattr(self, f"stage{index + 1}")(x)
        return self.classifier(self.pool(x))


class MLP(nn.Module):
    """Flatten → (Linear → ReLU) per hidden width → Linear; layers named `hidden1`, …, `classifier`."""

    def __init__(
        self,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
        in_features: int = 28 * 28,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        features = in_features
        self.depth = len(hidden)
        for index, width in enumerate(hidden):
            layer: list[nn.Module] = [nn.Linear(features, width), nn.ReLU()]
            if dropout > 0:
                layer.append(nn.Dropout(dropout))
            self.add_module(f"hidden{index + 1}", nn.Sequential(*layer))
            features = width
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.flatten(inputs)
        for index in range(self.depth):
            x = getattr(self, f"hidden{index + 1}")(x)
        return self.classifier(x)


@VISION_MODELS.register("mlp", "fully connected: flatten → hidden ReLU layers → linear")
def mlp(
    hidden: Sequence[int] = (128,),
    dropout: float = 0.0,
    in_features: int = 28 * 28,
    num_classes: int = 10,
) -> nn.Module:
    return MLP(tuple(hidden), dropout, in_features, num_classes)


def build_vision_model(arch: str, params: dict[str, Any] | None = None) -> nn.Module:
    """Build architecture `arch` (a `VISION_MODELS` name) with keyword `params`.

    Raises `UnknownNameError` for an unknown arch and `ValueError` naming the accepted parameters
    for an unknown parameter.
    """
    builder = VISION_MODELS.get(arch)
    check_vision_params(arch, params or {})
    return builder(**(params or {}))


def check_vision_params(arch: str, params: dict[str, Any]) -> None:
    """Raise `ValueError` if `params` has a name the builder of `arch` does not accept."""
    accepted = list(inspect.signature(VISION_MODELS.get(arch)).parameters)
    unknown = [name for name in params if name not in accepted]
    if unknown:
        raise ValueError(f"{arch!r} has no parameter {unknown[0]!r} (accepted: {', '.join(accepted)})")


__all__ = ["MLP", "VISION_MODELS", "ConvNet", "build_vision_model", "check_vision_params"]
