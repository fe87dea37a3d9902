"""Decoupled KD (Zhao et al. 2022): target-class and non-target-class parts of KD, weighted apart."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdkit.losses import classification as cls_losses
from kdkit.objectives.classifier.base import Objective, Outputs, labels_of, teacher_logits
from kdkit.registry import OBJECTIVES
from kdkit.settings import StrictModel


class DKDParams(StrictModel):
    alpha: float = Field(1.0, ge=0.0)  # weight of TCKD (target vs rest)
    beta: float = Field(8.0, ge=0.0)  # weight of NCKD (among non-target classes)
    temperature: float = Field(4.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0)  # ramp both parts linearly from 0 over this many optimizer steps


@OBJECTIVES.register(
    "dkd", "decoupled KD: α·TCKD (target vs rest) + β·NCKD (among non-targets); needs labels"
)
class DKDTerm(Objective):
    """Terms "dkd_target" = α·TCKD and "dkd_nontarget" = β·NCKD (both ×T², batch mean, nats),
    scaled by min(1, (step + 1) / warmup_steps) during warm-up, counting optimizer steps (the engine's
    step, restored on resume), as in Zhao et al. 2022."""

    Params = DKDParams
    needs_labels = True

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        p = self.params
        ramp = 1.0
        if p.warmup_steps and out.step is not None:
            ramp = min(1.0, (out.step + 1) / p.warmup_steps)
        elif p.warmup_steps and self.training:
            raise RuntimeError(
                "DKD's warm-up counts optimizer steps: call distiller.on_step(step) before each "
                "optimizer step (kdkit.engine.train does), or set warmup_steps: 0"
            )
        tckd, nckd = cls_losses.dkd_parts(
            out.student_logits, teacher_logits(out), labels_of(out, "dkd"), temperature=p.temperature
        )
        return {"dkd_target": ramp * p.alpha * tckd, "dkd_nontarget": ramp * p.beta * nckd}
