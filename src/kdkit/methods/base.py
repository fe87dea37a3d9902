"""What a method is: a small recipe that picks one entry per axis and sets defaults.

Every method is a class registered in `METHODS` with a `kind` ("classifier" or "lm") and a flat
pydantic `Params` model, so a run config writes `{name: s1, method: gkd, lmbda: 0.5, beta: 0.3}`
and every field is checked before any model is loaded. Each default is written once: in the
`Params` of the entry that owns it (a sampler, a signal, an objective), overridden by a method only
where the method's paper chooses another value.

- A classifier method returns its weighted objective entries (`ClassifierMethod.objectives`).
- An LM method names a sampler, a teacher signal and an objective (`LMMethod.parts`); its `Params`
  inherits the `Params` of those entries, and `LMMethod.build` splits them back out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from kdkit.objectives.lm import DivergenceParams
from kdkit.registry import LM_OBJECTIVES, SAMPLERS, TEACHER_SIGNALS
from kdkit.settings import LMContext, NoParams, ParamsModel
from kdkit.specs import method_of_kind

logger = logging.getLogger(__name__)


class Method:
    """Base of registered methods."""

    kind: ClassVar[str] = "?"
    Params: ClassVar[type[ParamsModel]] = NoParams

    @classmethod
    def params(cls, given: dict[str, Any] | None = None) -> ParamsModel:
        return cls.Params.model_validate(given or {})


# ---------------------------------------------------------------------------- classifier


class ClassifierMethod(Method):
    """A named default list of weighted objective entries (`{name, weight, ...params}` dicts)."""

    kind = "classifier"
    # True for a method over per-layer transformer features (MaKD): it builds its own distiller,
    # `distiller(params, student, teacher)`, and its Params say `needs_teacher()`.
    own_distiller: ClassVar[bool] = False

    @classmethod
    def objectives(cls, params: Any) -> list[dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError


# ---------------------------------------------------------------------------- language models


class LMWeights(ParamsModel):
    """kd_weight: weight of the objective's term against the teacher; ce_weight: weight of a
    cross-entropy term on *dataset* completions only (skipped on generated batches: their tokens
    are not ground truth). Both 0 is refused: nothing would train."""

    kd_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _something_to_train(self) -> LMWeights:
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing to train")
        return self


class DivergenceMethodParams(LMWeights, DivergenceParams):
    """An LM method minimising a divergence; `fused` computes it from hidden states in token
    chunks (the "hidden" teacher signal), never holding both [tokens × vocabulary] logits:
    "auto" (default) = fused whenever both models are Hugging Face causal LMs whose heads the fused
    loss reproduces (`kdkit.models.heads.fused_loss_support`), else the logits; true = fused or a
    clear error; false = always the logits. Values and gradients are the same either way (to
    1e-5 in float32); fused is faster and needs far less memory at large vocabularies.
    `cache` reads the teacher from a logit cache instead of running it (the "cache" signal; the
    name of one of the run's `caches:` or a folder built by `kdkit cache`; dataset sampler only);
    `cache_tail: false` renormalises a top-k cache over its kept ids instead of using the tail."""

    fused: bool | Literal["auto"] = "auto"
    cache: str | None = None
    cache_tail: bool = True

    @model_validator(mode="after")
    def _one_signal(self) -> DivergenceMethodParams:
        if self.fused is True and self.cache:
            raise ValueError("fused and cache exclude each other (a cache stores no hidden states)")
        return self


def divergence_signal(params: Any) -> str:
    """ "cache", "hidden" (fused: true, or "auto" until `LMMethod.build` sees the models) or "logits"."""
    if getattr(params, "cache", None):
        return "cache"
    return "logits" if params.fused is False else "hidden"


def resolve_fused(params: Any, student: Any, teacher: Any) -> Any:
    """`params` with `fused: "auto"` decided for these models: true when the fused loss reproduces
    both heads (and there is a teacher to project), else false, the reason logged once."""
    if getattr(params, "fused", None) != "auto":
        return params
    from kdkit.models.heads import fused_loss_support

    reason = "no teacher model" if teacher is None else None
    for role, model in (("student", student), ("teacher", teacher)):
        reason = reason or fused_loss_support(model, role)
    if reason is not None and reason not in _logged_auto:
        _logged_auto.add(reason)
        logger.info("fused: auto -> the materialised logits (%s)", reason)
    return params.model_copy(update={"fused": reason is None})


_logged_auto: set[str] = set()


@dataclass(frozen=True)
class LMParts:
    """The registry names an LM method composes."""

    sampler: str
    signal: str
    objective: str


class LMMethod(Method):
    """An LM method: which sampler, teacher signal and objective, with defaults in `Params`."""

    kind = "lm"

    @classmethod
    def parts(cls, params: Any) -> LMParts:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def params(cls, given: dict[str, Any] | None = None) -> ParamsModel:
        params = super().params(given)
        parts = cls.parts(params)
        if parts.signal == "cache" and parts.sampler != "dataset":
            raise ValueError(
                f"cache: a logit cache holds the teacher on the dataset's sequences only, but this method "
                f"trains on sequences from the {parts.sampler!r} sampler (generated, so not in the cache); "
                "use an off-policy method such as supervised_kd with the cache, or drop cache: here"
            )
        return params

    @classmethod
    def needs_teacher(cls, params: Any) -> bool:
        parts = cls.parts(params)
        live = getattr(TEACHER_SIGNALS.get(parts.signal), "needs_teacher_model", True)
        return bool((params.kd_weight > 0 and live) or parts.sampler in ("teacher", "student_teacher"))

    @classmethod
    def generates(cls, params: Any) -> bool:
        sampler = SAMPLERS.get(cls.parts(params).sampler)
        return bool(getattr(sampler, "generates", False)) and getattr(params, "lmbda", 1.0) > 0

    @classmethod
    def build(cls, params: Any, student: Any, teacher: Any, ctx: LMContext, **options: Any) -> Any:
        """The `LMDistiller` of these params; `options` go to the distiller (e.g. tokenizers)."""
        from kdkit.methods.lm_distiller import LMDistiller

        params = resolve_fused(params, student, teacher)
        parts = cls.parts(params)
        sampler = _build(SAMPLERS, parts.sampler, params, ctx)
        objective = _build(LM_OBJECTIVES, parts.objective, params, ctx)
        signal = _build(TEACHER_SIGNALS, parts.signal, params, ctx) if params.kd_weight > 0 else None
        return LMDistiller(
            student,
            teacher if cls.needs_teacher(params) else None,
            sampler=sampler,
            signal=signal,
            objective=objective,
            kd_weight=params.kd_weight,
            ce_weight=params.ce_weight,
            **options,
        )


def _build(registry: Any, name: str, params: BaseModel, ctx: LMContext) -> Any:
    """Instantiate `registry[name]` with the fields of `params` that its own `Params` declares."""
    entry = registry.get(name)
    fields = set(entry.Params.model_fields)
    return entry(entry.Params.model_validate(params.model_dump(include=fields)), ctx)


def lm_method(name: str) -> type[LMMethod]:
    """The LM method registered as `name`; ConfigError listing the LM methods otherwise."""
    return method_of_kind(name, "lm")  # type: ignore[no-any-return]


def classifier_method(name: str) -> type[ClassifierMethod]:
    """The classifier method registered as `name`; ConfigError listing them otherwise."""
    return method_of_kind(name, "classifier")  # type: ignore[no-any-return]


__all__ = [
    "ClassifierMethod",
    "DivergenceMethodParams",
    "divergence_signal",
    "resolve_fused",
    "LMMethod",
    "LMParts",
    "LMWeights",
    "Method",
    "classifier_method",
    "lm_method",
]
