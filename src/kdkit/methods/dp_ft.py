"""DP fine-tuning: cross-entropy on the private records' completion tokens, no teacher, averaged
per example; DP-SGD via the run config's `privacy:` (DP-OPD's no-teacher baseline)."""

from __future__ import annotations

from typing import Any

from kdkit.methods.base import LMParts
from kdkit.methods.dp_opd import PrivateLMMethod
from kdkit.registry import METHODS
from kdkit.settings import NoParams


@METHODS.register("dp_ft", "DP fine-tuning: per-example cross-entropy on the private records, no teacher; "
                  "DP-SGD via privacy:")
class DPFT(PrivateLMMethod):
    Params = NoParams
    mode = "ft"

    @classmethod
    def parts(cls, params: Any) -> LMParts:
        return LMParts("dataset", "none", "cross_entropy")
