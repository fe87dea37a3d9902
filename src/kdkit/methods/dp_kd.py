"""Off-policy DP-KD: the teacher's distributions on the private records' own completion tokens,
a divergence averaged per example; DP-SGD via the run config's `privacy:` (DP-OPD's baseline)."""

from __future__ import annotations

from typing import Any

from kdkit.methods.base import LMParts
from kdkit.methods.dp_opd import PrivateLMMethod
from kdkit.objectives.lm import DivergenceParams
from kdkit.registry import METHODS


class DPKDParams(DivergenceParams):
    divergence: str = "jsd"  # the same loss as dp_opd, so the two differ only in the sequences


@METHODS.register("dp_kd", "off-policy DP-KD: teacher distributions on the private records' own tokens, "
                  "per-example loss; DP-SGD via privacy:")
class DPKD(PrivateLMMethod):
    Params = DPKDParams
    mode = "kd"

    @classmethod
    def parts(cls, params: Any) -> LMParts:
        return LMParts("dataset", "logits", "divergence")
