"""Classifier distillation: objective terms a config composes, the distiller that sums them, recipes.

An objective term is a small `nn.Module` registered in `OBJECTIVES` with a pydantic `Params`
model (so a YAML entry `{name: kd, weight: 1, temperature: 4}` is validated field by field). It
receives the student's and teacher's logits and hooked features of one batch and returns named,
*unweighted* scalar terms; `ClassifierDistiller` multiplies them by the entry's weight. Learnable
parts (FitNet projectors) are submodules of the term, hence of the distiller: trained and
checkpointed with the student. The teacher never is.

A method recipe (`METHODS`: scratch, kd, dkd, fitnet, at, dist) is a default list of objective
entries; a config may name a method and override or add entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from kdkit.config.train import StrictModel
from kdkit.engine.distiller import Distiller
from kdkit.losses import classification as cls_losses
from kdkit.losses import features as feat_losses
from kdkit.methods.hooks import FeatureHooks
from kdkit.registry import METHODS, OBJECTIVES

# ----------------------------------------------------------------------------------------------
# What a term sees


@dataclass
class Outputs:
    """One batch through student and teacher. logits: [B, C]; labels: [B] int64; features: module
    name -> that module's output (e.g. [B, C, H, W]); teacher entries are None without a teacher."""

    student_logits: Tensor
    labels: Tensor
    teacher_logits: Tensor | None = None
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class FeatureShapes:
    """Per-example output shapes of hooked modules (no batch dimension), to size projectors."""

    student: dict[str, tuple[int, ...]]
    teacher: dict[str, tuple[int, ...]]


class Objective(nn.Module):
    """Base of objective terms. Subclasses set `Params`, `needs_teacher`, and implement `terms`."""

    Params: ClassVar[type[StrictModel]]
    needs_teacher: ClassVar[bool] = True

    def __init__(self, params: StrictModel) -> None:
        super().__init__()
        self.params = params

    def student_layers(self) -> list[str]:
        return []

    def teacher_layers(self) -> list[str]:
        return []

    def build(self, shapes: FeatureShapes) -> None:
        """Create learnable parts once the hooked feature shapes are known (default: none)."""

    def terms(self, out: Outputs) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def _teacher(out: Outputs) -> Tensor:
    if out.teacher_logits is None:
        raise RuntimeError("this objective needs a teacher, but the distiller has none")
    return out.teacher_logits


# ----------------------------------------------------------------------------------------------
# The terms


class CEParams(StrictModel):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


@OBJECTIVES.register("ce", "hard-label cross-entropy (nats)")
class CrossEntropyTerm(Objective):
    Params = CEParams
    needs_teacher = False

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        smoothing = self.params.label_smoothing
        return {"ce": F.cross_entropy(out.student_logits, out.labels, label_smoothing=smoothing)}


class KDParams(StrictModel):
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    t2_scaling: bool = True  # ×T² keeps the soft-target gradients' scale independent of T (Hinton et al.)


@OBJECTIVES.register("kd", "Hinton KD: α·T²·KL(p_T^τ ‖ p_S^τ) + (1−α)·CE")
class KDTerm(Objective):
    """Terms "kd" = α·[T²]·KL(softmax(t/T) ‖ softmax(s/T)) (batch mean, nats) and
    "kd_ce" = (1−α)·CE(s, y); with α = 0 this is plain cross-entropy, with α = 1 pure soft targets."""

    Params = KDParams

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        p = self.params
        result: dict[str, Tensor] = {}
        if p.alpha > 0:
            soft = cls_losses.kd_loss(
                out.student_logits, _teacher(out), temperature=p.temperature, t2_scaling=p.t2_scaling
            )
            result["kd"] = p.alpha * soft
        if p.alpha < 1:
            result["kd_ce"] = (1.0 - p.alpha) * F.cross_entropy(out.student_logits, out.labels)
        return result


class DKDParams(StrictModel):
    alpha: float = Field(1.0, ge=0.0)  # weight of TCKD (target vs rest)
    beta: float = Field(8.0, ge=0.0)  # weight of NCKD (among non-target classes)
    temperature: float = Field(4.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0)  # ramp both parts linearly from 0 over this many optimizer steps


@OBJECTIVES.register("dkd", "decoupled KD: α·TCKD (target vs rest) + β·NCKD (among non-targets)")
class DKDTerm(Objective):
    """Terms "dkd_target" = α·TCKD and "dkd_nontarget" = β·NCKD (both ×T², batch mean, nats),
    scaled by min(1, (step + 1) / warmup_steps) during warm-up, as in Zhao et al. 2022, where
    `step` is the 0-based optimizer step the engine announces through `on_step` (so gradient
    accumulation does not shorten the warm-up, and a resumed run continues it exactly)."""

    Params = DKDParams

    def __init__(self, params: StrictModel) -> None:
        super().__init__(params)
        self.step: int | None = None  # set by on_step

    def on_step(self, step: int) -> None:
        """The engine's step hook (see kdkit.engine.distiller.Distiller)."""
        self.step = step

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        state_dict.pop(prefix + "calls", None)  # the forward-call counter of older checkpoints
        super()._load_from_state_dict(state_dict, prefix, *args)

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        p = self.params
        ramp = 1.0
        if p.warmup_steps and self.step is not None:
            ramp = min(1.0, (self.step + 1) / p.warmup_steps)
        elif p.warmup_steps and self.training:
            raise RuntimeError(
                "DKD's warm-up counts optimizer steps: call distiller.on_step(step) before each "
                "optimizer step (kdkit.engine.train does), or set warmup_steps: 0"
            )
        tckd, nckd = cls_losses.dkd_parts(
            out.student_logits, _teacher(out), out.labels, temperature=p.temperature
        )
        return {"dkd_target": ramp * p.alpha * tckd, "dkd_nontarget": ramp * p.beta * nckd}


class DISTParams(StrictModel):
    beta: float = Field(1.0, ge=0.0)  # inter-class relation (per example, across classes)
    gamma: float = Field(1.0, ge=0.0)  # intra-class relation (per class, across the batch)
    temperature: float = Field(1.0, gt=0.0)


@OBJECTIVES.register("dist", "DIST: Pearson-correlation match of predictions, inter- and intra-class")
class DISTTerm(Objective):
    """Terms "dist_inter" = β·(1 − mean Pearson r over examples) and "dist_intra" = γ·(1 − mean
    Pearson r over classes), both ×T², of softmax(·/T) (Huang et al. 2022)."""

    Params = DISTParams

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        p = self.params
        student, teacher = out.student_logits, _teacher(out)
        # two calls (logits only, cheap) so the report can show each relation term on its own
        inter = cls_losses.dist_loss(student, teacher, beta=1.0, gamma=0.0, temperature=p.temperature)
        intra = cls_losses.dist_loss(student, teacher, beta=0.0, gamma=1.0, temperature=p.temperature)
        return {"dist_inter": p.beta * inter, "dist_intra": p.gamma * intra}


class FitNetParams(StrictModel):
    student_layer: str = "stage2"
    teacher_layer: str = "stage2"
    projector: Literal["auto", "conv", "linear", "none"] = "auto"
    loss: Literal["mse", "cosine"] = "mse"


@OBJECTIVES.register(
    "fitnet", "FitNet hint: projector(student feature) ≈ teacher feature (MSE), by module name"
)
class FitNetTerm(Objective):
    """Term "fitnet": MSE between projector(student feature) and the teacher feature, averaged
    over elements. The projector is a 1×1 conv + BN for [B,C,H,W] features ("auto" picks it) or a
    linear map for [B,D] ones; spatial sizes that differ are average-pooled to the smaller one."""

    Params = FitNetParams

    def student_layers(self) -> list[str]:
        return [self.params.student_layer]

    def teacher_layers(self) -> list[str]:
        return [self.params.teacher_layer]

    def build(self, shapes: FeatureShapes) -> None:
        p = self.params
        s_shape, t_shape = shapes.student[p.student_layer], shapes.teacher[p.teacher_layer]
        kind = p.projector
        if kind == "auto":
            kind = "conv" if len(s_shape) == 3 else "linear"
        if kind == "none":
            if s_shape[0] != t_shape[0]:
                raise ValueError(
                    f"fitnet: projector 'none' needs equal widths, got student {p.student_layer} "
                    f"{s_shape} and teacher {p.teacher_layer} {t_shape}"
                )
            self.projector: nn.Module = nn.Identity()
        elif kind == "conv":
            if len(s_shape) != 3 or len(t_shape) != 3:
                raise ValueError(
                    f"fitnet: a conv projector needs [C,H,W] features, got {s_shape} → {t_shape}"
                )
            self.projector = nn.Sequential(
                nn.Conv2d(s_shape[0], t_shape[0], 1, bias=False), nn.BatchNorm2d(t_shape[0])
            )
        else:
            self.projector = nn.Linear(_flat(s_shape), _flat(t_shape))

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        p = self.params
        student = out.student_features[p.student_layer]
        teacher = out.teacher_features[p.teacher_layer]
        if isinstance(self.projector, nn.Linear):
            student = self.projector(student.flatten(1))
            teacher = teacher.flatten(1)
        else:
            student = self.projector(student)
            student, teacher = _same_spatial(student, teacher)
        if p.loss == "cosine":
            return {"fitnet": feat_losses.cosine_feature_loss(student.flatten(1), teacher.flatten(1))}
        return {"fitnet": feat_losses.hint_loss(student, teacher)}


class ATParams(StrictModel):
    pairs: list[tuple[str, str]] = Field(
        default_factory=lambda: [("stage1", "stage1"), ("stage2", "stage2")],
        description="(student module, teacher module) pairs",
    )
    p: float = Field(2.0, gt=0.0)


@OBJECTIVES.register("at", "attention transfer: match normalised spatial attention maps of layer pairs")
class ATTerm(Objective):
    """Term "at": attention-transfer loss summed over the (student, teacher) layer pairs; each
    map is Σ_c |F_c|^p over channels, flattened and L2-normalised (Zagoruyko & Komodakis 2017)."""

    Params = ATParams

    def student_layers(self) -> list[str]:
        return [s for s, _ in self.params.pairs]

    def teacher_layers(self) -> list[str]:
        return [t for _, t in self.params.pairs]

    def build(self, shapes: FeatureShapes) -> None:
        for s, t in self.params.pairs:
            if len(shapes.student[s]) != 3 or len(shapes.teacher[t]) != 3:
                raise ValueError(
                    f"at: attention maps need [C,H,W] features, got {s} {shapes.student[s]} and "
                    f"{t} {shapes.teacher[t]}"
                )

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        student = [out.student_features[s] for s, _ in self.params.pairs]
        teacher = [out.teacher_features[t] for _, t in self.params.pairs]
        # the loss pools the larger map of a pair to the smaller size itself
        return {"at": feat_losses.attention_transfer_loss(student, teacher, p=self.params.p)}


def _flat(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _same_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two [B,C,H,W] maps to the other's H×W (no-op when equal)."""
    if student.ndim != 4 or student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    return F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)


# ----------------------------------------------------------------------------------------------
# Entries as a config writes them


class ObjectiveSpec(StrictModel):
    """One weighted term: `{name: kd, weight: 1.0, temperature: 4}`; other fields are the term's
    params, validated against its `Params` model (errors are located at the field)."""

    model_config = StrictModel.model_config | {"extra": "allow"}

    name: str
    weight: float = Field(1.0, ge=0.0)

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        return OBJECTIVES.canonical(value)  # UnknownNameError is a ValueError: "'kdd' is not a objective (…)"

    @model_validator(mode="after")
    def _valid_params(self) -> ObjectiveSpec:
        # Raising the params model's own ValidationError here keeps its locations, so an error
        # reads `objectives.0.temperature: Input should be a valid number`.
        OBJECTIVES.get(self.name).Params.model_validate(self.model_extra or {})
        return self

    def params(self) -> StrictModel:
        return OBJECTIVES.get(self.name).Params.model_validate(self.model_extra or {})


def build_objective(spec: ObjectiveSpec | Mapping[str, Any]) -> Objective:
    """The term module for one entry (learnable parts are built later, by the distiller)."""
    spec = spec if isinstance(spec, ObjectiveSpec) else ObjectiveSpec.model_validate(spec)
    return OBJECTIVES.get(spec.name)(spec.params())


# ----------------------------------------------------------------------------------------------
# The distiller


class ClassifierDistiller(Distiller):
    """Student + objective terms (+ their projectors); the frozen teacher stays outside the tree.

    forward(batch) with batch = {"inputs": [B, ...], "labels": [B]} runs the teacher once under
    no_grad and the student once, with forward hooks on the modules the terms name, and returns
    every term already multiplied by its entry's weight, e.g. {"kd": …, "kd_ce": …} (scalars).
    A name used twice gets a suffix ("at", "at_2").
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        objectives: Sequence[ObjectiveSpec | Mapping[str, Any]],
        example_inputs: Tensor | None = None,
    ) -> None:
        super().__init__(student, teacher)
        specs = [o if isinstance(o, ObjectiveSpec) else ObjectiveSpec.model_validate(o) for o in objectives]
        if not specs:
            raise ValueError("a classifier distiller needs at least one objective")
        self.weights = [spec.weight for spec in specs]
        self.terms = nn.ModuleList(build_objective(spec) for spec in specs)
        needing = [spec.name for spec, term in zip(specs, self.terms) if term.needs_teacher]
        if needing and teacher is None:
            raise ValueError(f"objective {needing[0]!r} needs a teacher, but none was given")
        self.student_layers = list(dict.fromkeys(n for t in self.terms for n in t.student_layers()))
        self.teacher_layers = list(dict.fromkeys(n for t in self.terms for n in t.teacher_layers()))
        self.uses_teacher = bool(needing)
        if self.student_layers or self.teacher_layers:
            if example_inputs is None:
                raise ValueError(
                    "feature objectives need example_inputs (one small batch) to size projectors"
                )
            shapes = self._feature_shapes(example_inputs)
            for term in self.terms:
                term.build(shapes)

    @torch.no_grad()
    def _feature_shapes(self, example_inputs: Tensor) -> FeatureShapes:
        # Eval mode: a probe pass must not update BatchNorm running statistics.
        student, teacher = self.student, self.teacher
        was_training = student.training
        student.eval()
        try:
            with FeatureHooks(student, self.student_layers) as hooks:
                student(example_inputs)
                s_shapes = {n: tuple(hooks.get(n).shape[1:]) for n in self.student_layers}
        finally:
            student.train(was_training)
        t_shapes: dict[str, tuple[int, ...]] = {}
        if teacher is not None and self.teacher_layers:
            with FeatureHooks(teacher, self.teacher_layers) as hooks:
                teacher(example_inputs.to(next(teacher.parameters()).device))
                t_shapes = {n: tuple(hooks.get(n).shape[1:]) for n in self.teacher_layers}
        return FeatureShapes(s_shapes, t_shapes)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        inputs, labels = batch["inputs"], batch["labels"]
        out = Outputs(student_logits=inputs.new_zeros(()), labels=labels)
        if self.uses_teacher:
            teacher = self.teacher
            assert teacher is not None
            with torch.no_grad(), FeatureHooks(teacher, self.teacher_layers) as hooks:
                out.teacher_logits = teacher(inputs)
                out.teacher_features = dict(hooks.features)
        with FeatureHooks(self.student, self.student_layers) as hooks:
            out.student_logits = self.student(inputs)
            out.student_features = dict(hooks.features)
        losses: dict[str, Tensor] = {}
        for weight, term in zip(self.weights, self.terms):
            for key, value in term.terms(out).items():
                name, index = key, 2
                while name in losses:
                    name, index = f"{key}_{index}", index + 1
                losses[name] = weight * value
        return losses


# ----------------------------------------------------------------------------------------------
# Method recipes


@dataclass(frozen=True)
class ClassifierRecipe:
    """A named default list of objective entries (`{name, weight, ...params}` dicts)."""

    objectives: tuple[dict[str, Any], ...]
    needs_teacher: bool = True

    def expand(self, overrides: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
        """The recipe's entries, each updated by an override of the same name; others appended."""
        entries = [dict(entry) for entry in self.objectives]
        for override in overrides:
            override = dict(override)
            match = next((e for e in entries if e["name"] == override.get("name")), None)
            if match is None:
                entries.append(override)
            else:
                match.update(override)
        return entries


def _recipe(name: str, description: str, *objectives: dict[str, Any], needs_teacher: bool = True) -> None:
    METHODS.add(name, ClassifierRecipe(tuple(objectives), needs_teacher), description)


_recipe(
    "scratch",
    "classifier baseline: the student on hard labels alone (no teacher)",
    {"name": "ce"},
    needs_teacher=False,
)
_recipe(
    "kd",
    "Hinton KD for classifiers: soft targets at temperature T mixed with CE",
    {"name": "kd", "temperature": 4.0, "alpha": 0.9},
)
_recipe(
    "dkd",
    "decoupled KD (Zhao et al. 2022): CE + α·TCKD + β·NCKD",
    {"name": "ce"},
    {"name": "dkd", "alpha": 1.0, "beta": 8.0, "temperature": 4.0},
)
_recipe(
    "fitnet",
    "FitNet hints (Romero et al. 2015): KD + MSE of a projected student feature",
    {"name": "kd", "temperature": 4.0, "alpha": 0.9},
    {"name": "fitnet", "weight": 1.0, "student_layer": "stage2", "teacher_layer": "stage2"},
)
_recipe(
    "at",
    "attention transfer (Zagoruyko & Komodakis 2017): CE + spatial attention-map match",
    {"name": "ce"},
    {"name": "at", "weight": 500.0},  # β/2 with β = 1000, as in the reference code
)
_recipe(
    "dist",
    "DIST (Huang et al. 2022): CE + Pearson-correlation relations of predictions",
    {"name": "ce"},
    {"name": "dist", "beta": 1.0, "gamma": 1.0},
)


def classifier_recipe(name: str) -> ClassifierRecipe:
    """The classifier recipe registered as `name`; ValueError if it is another kind of method."""
    recipe = METHODS.get(name)
    if not isinstance(recipe, ClassifierRecipe):
        names = [n for n, _, r in METHODS.items() if isinstance(r, ClassifierRecipe)]
        raise ValueError(f"{name!r} is not a classifier method (known: {', '.join(names)})")
    return recipe


__all__ = [
    "ATTerm",
    "ClassifierDistiller",
    "ClassifierRecipe",
    "CrossEntropyTerm",
    "DISTTerm",
    "DKDTerm",
    "FeatureShapes",
    "FitNetTerm",
    "KDTerm",
    "Objective",
    "ObjectiveSpec",
    "Outputs",
    "build_objective",
    "classifier_recipe",
]
