"""DPO on (chosen, rejected) pair batches against a frozen reference's token log-probs (SODA).

The batch holds each pair as two rows: rows [0, B) the chosen completions, rows [B, 2B) the
rejected ones of the same prompts, and `batch["pairs"] = B` (`kdkit.methods.soda.PairCollator`).
The reference model sits in the teacher slot; the `token_logprobs` signal gives its log-probs of
every row's tokens. The objective sums them per row and applies `kdkit.losses.dpo_loss`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, PositiveFloat
from torch import Tensor

from kdkit.losses.preference import dpo_loss
from kdkit.losses.tokens import shift, token_log_probs
from kdkit.objectives.lm.base import LMObjective, StudentView
from kdkit.registry import LM_OBJECTIVES
from kdkit.settings import ParamsModel
from kdkit.signals.base import TeacherTarget


class DPOParams(ParamsModel):
    """beta: the DPO temperature β; nll_weight: weight of the mean NLL of the chosen tokens added
    to the term (0 = off); label_smoothing: conservative DPO's ε for noisy preferences."""

    beta: PositiveFloat = 0.1
    nll_weight: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)


@LM_OBJECTIVES.register(
    "dpo", "DPO on (chosen, rejected) pairs vs a frozen reference (SODA); optional NLL term"
)
class DPOObjective(LMObjective):
    """Returns {"kd": dpo + nll_weight·nll, "dpo", "nll", "reward_accuracy", "margin"} (nats)."""

    Params = DPOParams
    accepts = ("token_logprobs",)

    def __call__(
        self, student: StudentView, batch: dict[str, Any], target: TeacherTarget, *, ce_ratio: float = 0.0
    ) -> dict[str, Tensor]:
        if ce_ratio > 0:
            raise ValueError(
                "a cross-entropy term on pair batches would also train on the rejected rows: set "
                "ce_weight to 0 and use the dpo objective's nll_weight (NLL on the chosen rows)"
            )
        if "pairs" not in batch:
            raise ValueError(
                "the dpo objective trains on pair batches (chosen rows, then rejected rows, and "
                "batch['pairs']); build them with kdkit.methods.soda.PairCollator"
            )
        self.check_target(target)
        pairs = int(batch["pairs"])
        logits, targets, mask = shift(student.logits, batch["labels"])
        token_logps = token_log_probs(logits, targets) * mask
        policy = token_logps.sum(-1)  # [2B] summed nats
        reference = (target.token_logprobs * mask).sum(-1)
        p = self.params
        out = dpo_loss(
            policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], p.beta, p.label_smoothing
        )
        nll = -token_logps[:pairs].sum() / mask[:pairs].sum().clamp_min(1)
        return {
            "kd": out.loss + p.nll_weight * nll if p.nll_weight > 0 else out.loss,
            "dpo": out.loss.detach(),
            "nll": nll.detach(),
            "reward_accuracy": (out.margins > 0).float().mean(),
            "margin": out.margins.mean(),
        }
