"""Language-model distillation: one `LMDistiller` and the named recipes (seqkd, gkd, on_policy, ...).

Every LM method is sampler × objective (DESIGN.md):

- the sampler decides which sequences are trained on (dataset / teacher / student / λ-mixture);
  it runs inside `forward` on the unwrapped student, so the engine loop never changes;
- the objective is either a token-level divergence from `kdkit.losses.DIVERGENCES` against the
  teacher's full distribution (materialised logits, or the fused chunked loss on hidden states),
  or the sampled-token advantage loss that needs only the teacher's log-probs of the sampled tokens;
- an optional cross-entropy term on *dataset* completions only: it is skipped on batches the
  teacher or student generated (their tokens are not ground truth).

`forward` returns the weighted terms ("kd", "ce") plus detached diagnostics whose names start with
"_" (the engine logs them as diag/... and leaves them out of the loss): the *unweighted* values
"_kd_raw" / "_ce_raw" so the two magnitudes can be compared, the number of completion tokens
trained on, whether the batch was on-policy, and generation time.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdkit.engine.distiller import Distiller
from kdkit.losses.fused import fused_linear_divergence
from kdkit.methods.lm_objectives import (
    chunked_cross_entropy,
    completion_cross_entropy,
    sampled_token_loss,
    shared_vocab,
    shift,
    token_divergence,
    token_log_probs,
)
from kdkit.registry import METHODS
from kdkit.samplers import (
    DatasetSampler,
    GenerationSettings,
    MixtureSampler,
    StudentSampler,
    TeacherSampler,
)

log = logging.getLogger(__name__)

Objective = Literal["divergence", "sampled_token"]
SamplerName = Literal["dataset", "teacher", "student", "mixture", "student_teacher"]
#: A warning is logged once when one weighted term is this many times smaller than the other.
MAGNITUDE_WARNING_RATIO = 1000.0


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(decoder returning final-normed hidden states, LM head) of a Hugging Face causal LM."""
    prefix = getattr(model, "base_model_prefix", "model")
    backbone = getattr(model, prefix, None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None:
        raise ValueError(
            f"fused=True needs a Hugging Face causal LM with a backbone and an LM head, got {type(model)}"
        )
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        raise ValueError("fused=True does not apply final-logit soft-capping; use fused=False for this model")
    return backbone, head


class LMDistiller(Distiller):
    """A causal-LM student distilled from a frozen causal-LM teacher (see the module docstring).

    sampler: a batch transform from `kdkit.samplers` (default: the dataset's completions).
    objective: "divergence" (token-level `divergence` with `divergence_kwargs`, e.g. beta/alpha)
        or "sampled_token" (advantage −advantage_coef·(log p_S − log p_T), future terms summed
        with discount `gamma`).
    temperature: the distillation temperature of the divergence (the sampler has its own).
    kd_weight, ce_weight: weights of the "kd" and "ce" terms; a weight of 0 drops the term.
    fused: compute the divergence from final hidden states and LM-head weights in token chunks
        (`kdkit.losses.fused`), never holding both [tokens × vocab] logits; "divergence" only.
    is_clip: upper clip of the per-token importance ratio p_S/p_T used by the sampled-token
        objective on teacher-sampled batches (student samples have ratio 1 exactly; dataset
        batches have no behaviour probabilities and are used without a ratio).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        sampler: Any | None = None,
        objective: Objective = "divergence",
        divergence: str = "fkl",
        divergence_kwargs: dict[str, Any] | None = None,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        fused: bool = False,
        chunk_size: int | None = None,
        advantage_coef: float = 1.0,
        gamma: float = 0.0,
        is_clip: float = 5.0,
    ) -> None:
        super().__init__(student, teacher)
        if kd_weight > 0 and teacher is None:
            raise ValueError("kd_weight > 0 needs a teacher (set kd_weight=0 for plain fine-tuning)")
        if kd_weight == 0 and ce_weight == 0:
            raise ValueError("both kd_weight and ce_weight are 0: nothing to train")
        if fused and objective != "divergence":
            raise ValueError("fused=True works with objective='divergence' only")
        if temperature <= 0:
            raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
        if objective == "divergence":
            from kdkit.losses import DIVERGENCES

            DIVERGENCES.get(divergence)  # fail at construction, not at the first step
        self.sampler = sampler or DatasetSampler()
        self.objective, self.divergence = objective, divergence
        self.divergence_kwargs = dict(divergence_kwargs or {})
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
        self.fused, self.chunk_size = fused, chunk_size
        self.advantage_coef, self.gamma, self.is_clip = advantage_coef, gamma, is_clip
        self._warned_magnitude = False

    # ------------------------------------------------------------------ forward

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        batch = self.sampler(batch, student=self.student, teacher=self.teacher)
        source = batch.get("source", "dataset")
        labels = batch["labels"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        want_ce = self.ce_weight > 0 and source == "dataset"  # CE only on ground-truth tokens
        want_kd = self.kd_weight > 0
        raw: dict[str, Tensor] = {}

        if self.fused:
            raw |= self._fused_terms(inputs, labels, want_kd, want_ce)
        else:
            logits = self.student(**inputs).logits
            if want_kd:
                with torch.no_grad():
                    teacher_logits = self.teacher(**inputs).logits
                raw |= self._kd_term(logits, teacher_logits, labels, source)
            if want_ce:
                raw["ce"] = completion_cross_entropy(logits, labels)

        terms = {}
        if "kd" in raw:
            terms["kd"] = self.kd_weight * raw["kd"]
        if "ce" in raw:
            terms["ce"] = self.ce_weight * raw["ce"]
        if not terms:  # a generated batch under a CE-only setup: nothing to learn from it
            terms["ce"] = labels.new_zeros((), dtype=torch.float32).requires_grad_()
        self._check_magnitudes(terms)
        return terms | self._diagnostics(raw, batch, labels, source)

    def _kd_term(
        self, logits: Tensor, teacher_logits: Tensor, labels: Tensor, source: str
    ) -> dict[str, Tensor]:
        if self.objective == "divergence":
            kd = token_divergence(
                logits,
                teacher_logits,
                labels,
                divergence=self.divergence,
                temperature=self.temperature,
                **self.divergence_kwargs,
            )
            return {"kd": kd}
        student, teacher = shared_vocab(logits, teacher_logits)
        shifted, targets, mask = shift(teacher, labels)
        teacher_lp = token_log_probs(shifted, targets)
        weights = None
        if source == "teacher":  # samples from p_T, not p_S: per-token importance ratio, clipped
            with torch.no_grad():
                student_lp = token_log_probs(shift(student, labels)[0], targets)
                weights = (student_lp - teacher_lp).exp().clamp(max=self.is_clip)
        loss, diagnostics = sampled_token_loss(
            student,
            teacher_lp,
            labels,
            coef=self.advantage_coef,
            gamma=self.gamma,
            importance_weights=weights,
        )
        return {"kd": loss, "log_ratio": diagnostics["log_ratio"]}

    def _fused_terms(
        self, inputs: dict[str, Tensor], labels: Tensor, want_kd: bool, want_ce: bool
    ) -> dict[str, Tensor]:
        backbone, head = backbone_and_head(self.student)
        hidden = backbone(**inputs).last_hidden_state  # [B, T, H_S]
        weight, bias = head.weight, head.bias
        out: dict[str, Tensor] = {}
        if want_kd:
            t_backbone, t_head = backbone_and_head(self.teacher)
            with torch.no_grad():
                t_hidden = t_backbone(**inputs).last_hidden_state  # [B, T, H_T]
            shared = min(weight.shape[0], t_head.weight.shape[0])  # padded vocabularies: shared ids only
            mask = labels[:, 1:] != -100
            out["kd"] = fused_linear_divergence(
                hidden[:, :-1],
                weight[:shared],
                t_hidden[:, :-1],
                t_head.weight[:shared],
                divergence=self.divergence,
                temperature=self.temperature,
                mask=mask,
                reduction="mean",
                chunk_size=self.chunk_size,
                student_bias=None if bias is None else bias[:shared],
                teacher_bias=None if t_head.bias is None else t_head.bias[:shared],
                **self.divergence_kwargs,
            )
        if want_ce:
            if bias is not None:
                raise ValueError("fused cross-entropy assumes a bias-free LM head")
            out["ce"] = chunked_cross_entropy(hidden, weight, labels, chunk_size=self.chunk_size or 1024)
        return out

    # ------------------------------------------------------------------ logging

    def _diagnostics(
        self, raw: dict[str, Tensor], batch: dict[str, Any], labels: Tensor, source: str
    ) -> dict[str, Tensor]:
        def value(x: float | Tensor) -> Tensor:
            return torch.as_tensor(x, dtype=torch.float32, device=labels.device).detach().reshape(())

        info = batch.get("sampler_info", {})
        out = {f"_{name}_raw": value(v) for name, v in raw.items() if name in ("kd", "ce")}
        if "log_ratio" in raw:
            out["_log_ratio"] = value(raw["log_ratio"])  # E[log p_S − log p_T] over sampled tokens
        out["_tokens"] = value(float((labels[:, 1:] != -100).sum()))
        out["_on_policy"] = value(1.0 if source == "student" else 0.0)
        out["_gen_s"] = value(info.get("generation_s", 0.0))
        if "truncated" in info:
            out["_truncated"] = value(info["truncated"])
        return out

    def _check_magnitudes(self, terms: dict[str, Tensor]) -> None:
        if self._warned_magnitude or len(terms) < 2:
            return
        kd, ce = float(terms["kd"].detach().abs()), float(terms["ce"].detach().abs())
        small, large = sorted((kd, ce))
        if small > 0 and large / small > MAGNITUDE_WARNING_RATIO:
            log.warning(
                "kdkit: the weighted kd term (%.3g) and ce term (%.3g) differ by more than %.0f×; "
                "the smaller one barely moves the student, check kd_weight / ce_weight",
                kd,
                ce,
                MAGNITUDE_WARNING_RATIO,
            )
            self._warned_magnitude = True


# ---------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class LMRecipe:
    """Defaults of a named LM method; `build` turns them into an `LMDistiller`.

    sampler: "dataset" | "teacher" | "student" | "mixture" (λ student, else dataset) |
        "student_teacher" (λ student, else teacher: MiniLLM's mix, per batch here).
    sampling_temperature / top_p / max_new_tokens: how sequences are sampled; `temperature` is
    the separate distillation temperature of the loss.
    """

    sampler: SamplerName = "dataset"
    lmbda: float = 0.5
    objective: Objective = "divergence"
    divergence: str = "fkl"
    divergence_kwargs: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    gamma: float = 0.0
    sampling_temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    def replace(self, **overrides: Any) -> LMRecipe:
        return dataclasses.replace(self, **overrides)

    def build_sampler(
        self, *, eos_token_id: int | None = None, pad_token_id: int | None = None, seed: int | None = None
    ) -> Any:
        settings = GenerationSettings(
            temperature=self.sampling_temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        if self.sampler == "dataset":
            return DatasetSampler()
        if self.sampler == "teacher":
            return TeacherSampler(settings)
        if self.sampler == "student":
            return StudentSampler(settings)
        if self.sampler == "mixture":
            return MixtureSampler(self.lmbda, StudentSampler(settings), DatasetSampler(), seed=seed)
        if self.sampler == "student_teacher":
            return MixtureSampler(self.lmbda, StudentSampler(settings), TeacherSampler(settings), seed=seed)
        raise ValueError(f"unknown sampler {self.sampler!r}")

    def build(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        **distiller_options: Any,
    ) -> LMDistiller:
        """The distiller; `distiller_options` (fused, chunk_size, ...) go to `LMDistiller`.

        seed: the mixture sampler's coin; None draws from the global RNG that the engine seeds
        from `TrainConfig.seed` and restores on resume.
        """
        return LMDistiller(
            student,
            teacher,
            sampler=self.build_sampler(eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed),
            objective=self.objective,
            divergence=self.divergence,
            divergence_kwargs=self.divergence_kwargs,
            temperature=self.temperature,
            kd_weight=self.kd_weight,
            ce_weight=self.ce_weight,
            gamma=self.gamma,
            **distiller_options,
        )


LM_RECIPES: dict[str, tuple[LMRecipe, str]] = {
    "supervised_kd": (
        LMRecipe(sampler="dataset", divergence="fkl"),
        "LM off-policy KD: forward KL to the teacher on the dataset's completions",
    ),
    "seqkd": (
        LMRecipe(sampler="teacher", divergence="fkl"),
        "sequence-level KD: forward KL on the teacher's own sampled completions",
    ),
    "on_policy": (
        LMRecipe(sampler="student", divergence="rkl"),
        "on-policy KD: reverse KL on the student's own samples (no exposure bias)",
    ),
    "gkd": (
        LMRecipe(sampler="mixture", lmbda=0.5, divergence="jsd", divergence_kwargs={"beta": 0.5}),
        "generalized KD: λ=0.5 mix of student samples and dataset, JSD β=0.5",
    ),
    "sampled_token": (
        LMRecipe(sampler="student", objective="sampled_token"),
        "on-policy KD from the teacher's log-probs of the student's sampled tokens only (advantage PG)",
    ),
    "minillm": (
        LMRecipe(sampler="student_teacher", lmbda=0.8, objective="sampled_token", gamma=1.0),
        "MiniLLM-style reverse KL by policy gradient: reward-to-go log(p_T/p_S), 0.8 student / 0.2 teacher",
    ),
}

for _name, (_recipe, _description) in LM_RECIPES.items():
    METHODS.add(_name, _recipe, _description)
