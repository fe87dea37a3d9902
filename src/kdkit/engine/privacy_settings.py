"""Settings of the DP-SGD engine mode (`kdkit.engine.private`); pydantic only, so configs stay light."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from kdkit.settings import StrictModel


class PrivacyConfig(StrictModel):
    """DP-SGD settings. Give exactly one of `noise_multiplier` (σ) or `target_epsilon`.

    target_epsilon: σ is derived so that ε at `delta` after `TrainConfig.steps` steps is ≤ this.
    delta: δ of (ε, δ); default 1/N (N = number of private records). A δ above 1/N is refused:
        it would allow leaking a whole record with probability δ per record.
    max_grad_norm: C, the per-example clipping norm (replaces `TrainConfig.max_grad_norm`).
    sample_rate: q; default `TrainConfig.batch_size` / N (batch_size is then the *expected* batch).
    accountant: "rdp" or "prv" (see `kdkit.privacy.epsilon`).
    max_physical_batch_size: split a sampled batch into chunks of at most this many examples
        (gradients are clipped per example and accumulated, then noised once): bounds memory only.
    grad_sample_mode: "hooks" (Opacus' per-layer rules, functorch for layers without one) or
        "functorch" (functorch for every layer).
    secure_mode: Opacus' secure noise (needs torchcsprng); off by default, in which case the
        sampling and noise come from seeded PRNGs: reproducible, but not secure against someone who
        knows the seed (state this when publishing ε).
    """

    noise_multiplier: float | None = Field(None, ge=0.0)
    target_epsilon: PositiveFloat | None = None
    delta: float | None = Field(None, gt=0.0, lt=1.0)
    max_grad_norm: PositiveFloat = 1.0
    sample_rate: float | None = Field(None, gt=0.0, le=1.0)
    accountant: Literal["rdp", "prv"] = "rdp"
    max_physical_batch_size: PositiveInt | None = None
    grad_sample_mode: Literal["hooks", "functorch"] = "hooks"
    secure_mode: bool = False

    @model_validator(mode="after")
    def _one_noise_setting(self) -> PrivacyConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of privacy.noise_multiplier (σ) or privacy.target_epsilon")
        return self


__all__ = ["PrivacyConfig"]
