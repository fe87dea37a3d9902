"""DP-OPD (Khadem et al. 2026): differentially private on-policy distillation.

Only the student is private: a run config's `privacy:` section trains it with DP-SGD
(`kdkit.engine.private`). For each private record the student continues a prefix of it (the
prompt, plus `prefix_fraction` of the completion); the frozen teacher scores the continuation; the
loss is a divergence (GKD's JSD β = 0.5 by default) on the continuation tokens only, averaged per
example, so each example's rollout and targets depend on that record alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from kdkit.methods.base import LMMethod, LMParts
from kdkit.objectives.lm import DivergenceParams
from kdkit.registry import METHODS
from kdkit.samplers.base import GenerationParams, generation_settings
from kdkit.settings import LMContext


class DPOPDParams(DivergenceParams, GenerationParams):
    """prefix_fraction: share of each record's completion kept in the prefix the student continues.
    lmbda: per-example probability of training on the student's rollout, else on the record's own
    continuation (1 = purely on-policy)."""

    divergence: str = "jsd"
    prefix_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    lmbda: float = Field(1.0, ge=0.0, le=1.0)


class PrivateLMMethod(LMMethod):
    """An LM method whose loss is a mean of per-example losses, as DP-SGD needs (`privacy:`)."""

    per_example: ClassVar[bool] = True
    mode: ClassVar[str] = "?"

    @classmethod
    def needs_teacher(cls, params: Any) -> bool:
        return cls.mode != "ft"

    @classmethod
    def generates(cls, params: Any) -> bool:
        return cls.mode == "opd"

    @classmethod
    def describe(cls, params: Any) -> str:
        """One line for reports: sequences, target and loss, each example's loss normalised alone."""
        if cls.mode == "opd":
            sequences = f"the student's continuations of each record's prefix (λ={params.lmbda:g})"
        else:
            sequences = "the records' own completions"
        if cls.mode == "ft":
            loss = "cross-entropy on the tokens"
        else:
            own = ", ".join(f"{k}={v}" for k, v in params.divergence_params.items())
            loss = (f"{params.divergence}{f' ({own})' if own else ''} to the teacher's distribution, "
                    f"distillation temperature {params.temperature:g}")
        return f"sequences: {sequences}; loss: {loss}; mean per example, then over examples (DP-SGD)"

    @classmethod
    def build(cls, params: Any, student: Any, teacher: Any, ctx: LMContext, **options: Any) -> Any:
        from kdkit.methods.private_distiller import PrivateLMDistiller

        kwargs: dict[str, Any] = {}
        if cls.mode != "ft":
            kwargs |= {"divergence": params.divergence, "divergence_kwargs": params.divergence_params,
                       "temperature": params.temperature}
        if cls.mode == "opd":
            kwargs |= {"generation": generation_settings(params, ctx), "lmbda": params.lmbda,
                       "prefix_fraction": params.prefix_fraction}
        return PrivateLMDistiller(student, teacher if cls.needs_teacher(params) else None, mode=cls.mode,
                                  tokenizers=options.get("tokenizers"), **kwargs)


@METHODS.register("dp_opd", "DP on-policy distillation: student continues each private record's prefix, "
                  "teacher scores it, per-example GKD loss; DP-SGD via privacy:")
class DPOPD(PrivateLMMethod):
    Params = DPOPDParams
    mode = "opd"

    @classmethod
    def parts(cls, params: Any) -> LMParts:
        return LMParts("student", "logits", "divergence")
