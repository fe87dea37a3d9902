"""MaKD — multi-aspect knowledge distillation of a transformer (Liu et al. 2026), as a `Distiller`.

The student (typically the teacher factorised by `kdkit.models.builders.factorize`, or a
layer-selected copy) learns from the frozen teacher through, each weighted and logged:

  kd           T²·KL(p_T^τ ‖ p_S^τ) on the output logits (Hinton KD)
  ce           cross-entropy on the labels
  attn_kl      KL between self-attention distributions of matched layers
  hidden_mse   MSE between hidden states (projected where the widths differ)
  attn_out_mse MSE between each matched layer's attention-block output
  ffn_out_mse  MSE between each matched layer's feed-forward-block output

With every aspect weight 0 this is plain logit KD (no feature pass at all); without a teacher and
kd_weight 0 it is from-scratch training — one class for the three arms of a fair comparison.
Batches: {"input_ids", "attention_mask", "labels"} (+ "token_type_ids"), labels [B] for sequence
classification (-100: unlabelled, left out of ce), or kdkit's `Examples` batches
{"inputs": {...}, "labels"} (`kdkit.distill` / `kdkit run` with method makd).
The raw (unweighted) value of every term is logged as "_raw_<term>".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from kdkit.engine.distiller import Distiller
from kdkit.losses.classification import kd_loss
from kdkit.losses.makd import layer_pairs, multi_aspect_terms
from kdkit.models.builders import layer_stack
from kdkit.models.taps import disable_attention_dropout, teacher_features, transformer_features
from kdkit.settings import ParamsModel

_ASPECT_WEIGHTS = {
    "attn_kl": "attn_weight",
    "hidden_mse": "hidden_weight",
    "attn_out_mse": "attn_out_weight",
    "ffn_out_mse": "ffn_out_weight",
}


class MaKDParams(ParamsModel):
    """Weights and knobs of MaKD. Defaults: every aspect at weight 1, logit KD at T = 2."""

    kd_weight: float = Field(1.0, ge=0.0)
    temperature: float = Field(2.0, gt=0.0)
    ce_weight: float = Field(1.0, ge=0.0)
    attn_weight: float = Field(1.0, ge=0.0)
    hidden_weight: float = Field(1.0, ge=0.0)
    attn_out_weight: float = Field(1.0, ge=0.0)
    ffn_out_weight: float = Field(1.0, ge=0.0)
    # "uniform", "last:K", a teacher layer per student layer, or [[student, teacher], ...] pairs
    layer_mapping: str | list[int] | list[list[int]] = "uniform"
    match_embeddings: bool = True  # also match the embedding outputs in hidden_mse
    attention_dropout: bool = False  # False: switch the student's attention dropout off (see below)

    @field_validator("layer_mapping")
    @classmethod
    def _mapping_form(cls, value: Any) -> Any:
        """The form is checked when the config loads; indices against the models when they are built."""
        if isinstance(value, str):
            if value.strip() != "uniform" and not re.fullmatch(r"last:[1-9]\d*", value.strip()):
                raise ValueError(f"{value!r}: use 'uniform', 'last:K' (K >= 1) or a list of teacher layers")
        elif not value:
            raise ValueError("an explicit layer mapping lists at least one layer")
        elif isinstance(value[0], list) and any(len(pair) != 2 for pair in value):
            raise ValueError(f"{value!r}: explicit pairs are [student layer, teacher layer]")
        return value

    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or bool(self.aspects())

    def aspects(self) -> list[str]:
        return [aspect for aspect, key in _ASPECT_WEIGHTS.items() if getattr(self, key) > 0]


LOGIT_KD = {"attn_weight": 0.0, "hidden_weight": 0.0, "attn_out_weight": 0.0, "ffn_out_weight": 0.0}
SCRATCH = {**LOGIT_KD, "kd_weight": 0.0}


class MaKDDistiller(Distiller):
    """Student + (optional) projection from the student's width to the teacher's; frozen teacher beside.

    student, teacher: Hugging Face sequence classifiers (encoders or decoders with a classification
    head) with blocks in one ModuleList; head counts must agree when attn_weight > 0.
    Attention dropout is switched off in the student (unless params.attention_dropout): rows of a
    dropped-out attention map do not sum to 1, so the attention KL would measure dropout noise.
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None, params: MaKDParams | None = None
    ) -> None:
        super().__init__(student, teacher)
        self.params = params or MaKDParams()
        p = self.params
        self.aspects = p.aspects()
        needs_teacher = p.kd_weight > 0 or bool(self.aspects)
        if needs_teacher and teacher is None:
            raise ValueError("MaKD with kd_weight > 0 or any aspect weight > 0 needs a teacher")
        self.pairs: list[tuple[int, int]] = []
        self.projection: nn.Module = nn.Identity()
        if self.aspects:
            assert teacher is not None
            n_s, n_t = len(layer_stack(student)[1]), len(layer_stack(teacher)[1])
            mapping: str | Sequence[Any] = p.layer_mapping
            try:
                self.pairs = layer_pairs(n_s, n_t, mapping)
            except ValueError as error:  # the field to fix, and both depths
                raise ValueError(
                    f"layer_mapping {mapping!r}: {error} (the student has {n_s} layers, the teacher {n_t})"
                ) from None
            d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
            if d_s != d_t:  # one learned map from the student's residual width to the teacher's
                self.projection = nn.Linear(d_s, d_t, bias=False)
            if "attn_kl" in self.aspects:
                h_s, h_t = student.config.num_attention_heads, teacher.config.num_attention_heads
                if h_s != h_t:
                    raise ValueError(
                        f"attention KL matches heads one to one: student has {h_s} heads, teacher {h_t} "
                        "(set attn_weight: 0, or build the student with the teacher's heads)"
                    )
            if not p.attention_dropout:
                disable_attention_dropout(student)

    def _features_options(self) -> dict[str, bool]:
        return {
            "hidden_states": "hidden_mse" in self.aspects,
            "attentions": "attn_kl" in self.aspects,
            "module_outputs": bool({"attn_out_mse", "ffn_out_mse"} & set(self.aspects)),
        }

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        p = self.params
        if "inputs" in batch:  # kdkit's Examples batches: {"inputs": {token tensors}, "labels", ...}
            batch = {**batch["inputs"], "labels": batch["labels"]}
        labels = batch["labels"]
        options = self._features_options()
        student_out = transformer_features(self.student, batch, **options)
        raw: dict[str, Tensor] = {}
        if p.ce_weight > 0:  # unlabelled examples (label -100) are left out; a batch of none gives 0
            labelled = labels != -100
            raw["ce"] = (
                F.cross_entropy(student_out.logits[labelled], labels[labelled])
                if bool(labelled.any()) else student_out.logits.sum() * 0.0
            )
        if self.teacher is not None and (p.kd_weight > 0 or self.aspects):
            teacher_out = teacher_features(self.teacher, batch, **options)
            if p.kd_weight > 0:
                raw["kd"] = kd_loss(student_out.logits, teacher_out.logits, temperature=p.temperature)
            if self.aspects:
                student_feats = student_out.as_dict()
                for key in ("hidden_states", "attention_out", "ffn_out"):
                    student_feats[key] = [self.projection(h) for h in student_feats[key]]
                mask = batch.get("attention_mask")
                raw.update(
                    multi_aspect_terms(
                        student_feats,
                        teacher_out.as_dict(),
                        self.pairs,
                        mask=None if mask is None else mask.bool(),
                        aspects=self.aspects,
                        match_embeddings=p.match_embeddings,
                    )
                )
        weights = {"ce": p.ce_weight, "kd": p.kd_weight} | {
            a: getattr(p, k) for a, k in _ASPECT_WEIGHTS.items()
        }
        out = {name: weights[name] * value for name, value in raw.items()}
        out.update({f"_raw_{name}": value.detach() for name, value in raw.items()})
        return out


@torch.no_grad()
def accuracy(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    """Fraction of correct argmax predictions of a sequence classifier over labelled batches."""
    model.eval()
    correct = total = 0
    for batch in batches:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += int(batch["labels"].numel())
    return correct / max(total, 1)


__all__ = ["LOGIT_KD", "SCRATCH", "MaKDDistiller", "MaKDParams", "accuracy"]
