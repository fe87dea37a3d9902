"""MaKD — multi-aspect distillation of a transformer classifier (Liu et al. 2026).

Logit KD + KL between self-attention distributions + MSE between hidden states (projected where
widths differ) + MSE between each attention block's and feed-forward block's outputs, every term
weighted and logged; the student is usually the teacher factorised to a parameter budget
(`kdkit.models.builders.factorize`) or a layer-selected copy (`derive_student`). Parameters:
`MaKDParams` (kd_weight, temperature, ce_weight, attn_weight, hidden_weight, attn_out_weight,
ffn_out_weight, layer_mapping, match_embeddings, attention_dropout).

The aspects need per-layer features of Hugging Face transformers (attention maps, hidden states,
block outputs), which the generic classifier distiller — one tensor in, logits out, hooked module
outputs — does not produce; `MaKD.distiller(params, student, teacher)` builds the distiller that
does (`MaKDDistiller`). `kdkit.distill(method="makd", ...)` and `kdkit run` configs whose models
are named by source (`students: [{name: m, method: makd, layer_mapping: [0, 5], attn_weight: 1}]`)
use it; the parameters are checked when the config loads, layer indices when the models are built.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdkit.methods.base import ClassifierMethod
from kdkit.methods.makd_distiller import MaKDDistiller, MaKDParams
from kdkit.registry import METHODS
from kdkit.settings import ConfigError


@METHODS.register(
    "makd",
    "MaKD: logit KD + attention-distribution KL + hidden-state MSE + attention/FFN block-output MSE "
    "(Hugging Face transformer students, e.g. low-rank factorised)",
)
class MaKD(ClassifierMethod):
    Params = MaKDParams
    own_distiller = True  # kdkit.distill and `kdkit run` build MaKD.distiller, not objective entries

    @classmethod
    def objectives(cls, params: Any) -> list[dict[str, Any]]:
        raise ConfigError(
            "method 'makd' matches attention maps and per-layer features of Hugging Face transformers; "
            "the tensor-input (arch:) classifier pipeline has none. Name the models by source "
            "(teacher.source, student.from_teacher or student.source) or call kdkit.distill(method='makd')"
        )

    @classmethod
    def distiller(cls, params: Any, student: nn.Module, teacher: nn.Module | None) -> MaKDDistiller:
        """The MaKD distiller for a transformer student and its frozen teacher."""
        if not isinstance(params, MaKDParams):
            params = cls.params(params)
        return MaKDDistiller(student, teacher, params)


__all__ = ["MaKD"]
