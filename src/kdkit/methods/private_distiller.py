"""Per-example LM objectives for DP-SGD: DP-OPD, off-policy DP-KD and DP fine-tuning.

DP-SGD clips each example's gradient, so each example's loss must depend on that example alone:
no normalisation by the batch's token count (that weights an example by the *other* examples'
lengths), no batch statistics, no per-batch coin that changes what one example trains on. Every
loss here is computed per example, as a mean over that example's own trained tokens, and the batch
loss is the plain mean of those: with `GradSampleModule(loss_reduction="mean")` each per-example
gradient is then exactly the gradient of that example's loss.

Modes (`PrivateLMDistiller(mode=...)`):

- "opd" (DP-OPD): the student continues a prefix of each private record (the record's prompt, plus
  the first `prefix_fraction` of its completion); the frozen teacher scores the continuation; the
  loss is a divergence from `kdkit.losses.DIVERGENCES` (GKD: generalized JSD by default) on the
  continuation tokens only. With `lmbda` < 1 each *example* (not batch) flips its own coin: with
  probability λ its rollout, else its own record's continuation (GKD's mixture, per example).
- "kd" (off-policy DP-KD): the same divergence on the record's own completion tokens.
- "ft" (DP fine-tuning): cross-entropy on the record's own completion tokens; no teacher.

Rollouts are sampled in one batched `kdkit.samplers.generation.generate_batch` call (KV cache,
left-padded prefixes, attention masks), so a row's tokens depend on its own prefix and the random
stream only.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdkit.data.padding import left_pad
from kdkit.engine.distiller import Distiller
from kdkit.losses import DIVERGENCES
from kdkit.losses.tokens import IGNORE_INDEX
from kdkit.samplers.collate import build_lm_batch
from kdkit.samplers.generation import GenerationSettings, generate_batch

Mode = Literal["opd", "kd", "ft"]
MODES: tuple[str, ...] = ("opd", "kd", "ft")


def per_example_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean of each row over its own counted positions: [B, T] and [B, T] bool -> [B].

    A row with no counted position gives 0 (with zero gradient), never NaN.
    """
    kept = torch.where(mask, per_token, per_token.new_zeros(()))
    return kept.sum(-1) / mask.sum(-1).clamp_min(1).to(per_token.dtype)


def per_example_divergence(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, divergence: str,
    temperature: float = 1.0, **divergence_kwargs: Any,
) -> Tensor:
    """Per-example mean divergence D(p_T, p_S) over each row's label tokens: [B] (nats).

    student_logits [B, T, V_S], teacher_logits [B, T, V_T], labels [B, T] (-100 = not trained).
    Position t predicts token t+1; vocabularies are cut to their shared first ids.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    size = min(student_logits.shape[-1], teacher_logits.shape[-1])
    fn = DIVERGENCES.get(divergence)
    per_token = fn(student_logits[:, :-1, :size], teacher_logits[:, :-1, :size], temperature=temperature,
                   mask=mask, reduction="none", **divergence_kwargs)
    return per_example_mean(per_token, mask)


def per_example_cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example mean negative log-likelihood of each row's label tokens: [B] (nats/token)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(student_logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return per_example_mean(nll, mask)


def _rows(batch: dict[str, Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) of each row of a right-padded batch (labels mark the completion)."""
    prompts, completions = [], []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = ids[mask.bool()].tolist()
        trained = (labels[mask.bool()] != IGNORE_INDEX).tolist()
        start = trained.index(True) if True in trained else len(real)
        prompts.append(real[:start])
        completions.append(real[start:])
    return prompts, completions


class PrivateLMDistiller(Distiller):
    """A causal-LM student trained under DP-SGD on per-example losses (see the module docstring).

    mode: "opd" | "kd" | "ft". divergence / divergence_kwargs / temperature: the distillation loss
    of "opd" and "kd" (any `DIVERGENCES` entry; the temperature is the loss's, not the sampler's).
    generation: how rollouts are sampled ("opd"). prefix_fraction: share of each record's
    completion (rounded down) kept in the prefix the student continues. lmbda: per-example
    probability of training on the rollout rather than on the record's own continuation ("opd").
    tokenizers: (teacher's, student's), to check vocabularies whose output sizes differ.
    forward returns {"kd" | "ce": mean over examples of per-example losses} plus diagnostics.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        mode: Mode = "opd",
        divergence: str = "jsd",
        divergence_kwargs: dict[str, Any] | None = None,
        temperature: float = 1.0,
        generation: GenerationSettings | None = None,
        prefix_fraction: float = 0.0,
        lmbda: float = 1.0,
        tokenizers: tuple[Any, Any] | None = None,
    ) -> None:
        super().__init__(student, teacher)
        if teacher is not None:  # one vocabulary (possibly padded differently), else refused
            from kdkit.methods.lm_distiller import check_teacher_student

            check_teacher_student(student, teacher, tokenizers)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "ft" and teacher is None:
            raise ValueError(f"mode {mode!r} needs a teacher (mode 'ft' is DP fine-tuning without one)")
        if not 0.0 <= prefix_fraction < 1.0:
            raise ValueError(f"prefix_fraction must be in [0, 1), got {prefix_fraction}")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        if temperature <= 0:
            raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
        DIVERGENCES.get(divergence)  # fail at construction, not at the first step
        self.mode, self.divergence, self.temperature = mode, divergence, temperature
        self.divergence_kwargs = dict(divergence_kwargs if divergence_kwargs is not None else
                                      ({"beta": 0.5} if divergence == "jsd" else {}))
        self.generation = generation or GenerationSettings()
        self.prefix_fraction, self.lmbda = prefix_fraction, lmbda

    # ------------------------------------------------------------------ sequences

    def _pad_id(self) -> int:
        config = getattr(self.student, "config", None)
        for value in (self.generation.pad_token_id, getattr(config, "pad_token_id", None),
                      self.generation.eos_token_id, getattr(config, "eos_token_id", None)):
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        raise ValueError("DP-OPD needs a pad or EOS token id (GenerationSettings.pad_token_id)")

    def rollout_batch(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        """DP-OPD's sequences: each record's prefix + the student's continuation (or, with
        probability 1 − λ per example, the record's own continuation); labels = continuation only."""
        prompts, completions = _rows(batch)
        prefixes, own = [], []
        for prompt, completion in zip(prompts, completions):
            keep = math.floor(self.prefix_fraction * len(completion))
            prefixes.append(prompt + completion[:keep])
            own.append(completion[keep:])
        pad = self._pad_id()
        device = batch["input_ids"].device
        prefix_ids, prefix_mask = left_pad(prefixes, pad)
        generated, info = generate_batch(self.student, prefix_ids.to(device), prefix_mask.to(device),
                                         self.generation)
        _, rollouts = _rows(generated)
        use_rollout = (torch.rand(len(rollouts)) < self.lmbda).tolist()  # one coin per example
        chosen = [r if flip else o for r, o, flip in zip(rollouts, own, use_rollout)]
        out = {k: v.to(device) for k, v in build_lm_batch(prefixes, chosen, pad).items()}
        info = {"generation_s": float(info["generation_s"]), "on_policy": sum(use_rollout) / len(use_rollout)}
        return out, info

    # ------------------------------------------------------------------ losses

    def per_example_losses(
        self, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, float]]:
        """([B] loss of each example, the batch trained on, info). Differentiable in the student."""
        info: dict[str, float] = {"generation_s": 0.0, "on_policy": 0.0}
        if self.mode == "opd":
            batch, info = self.rollout_batch(batch)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = self.student(**inputs).logits
        if self.mode == "ft":
            return per_example_cross_entropy(logits, batch["labels"]), batch, info
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        losses = per_example_divergence(logits, teacher_logits, batch["labels"], divergence=self.divergence,
                                        temperature=self.temperature, **self.divergence_kwargs)
        return losses, batch, info

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        losses, trained, info = self.per_example_losses(batch)
        name = "ce" if self.mode == "ft" else "kd"
        tokens = (trained["labels"][:, 1:] != IGNORE_INDEX).sum()
        device = losses.device
        return {
            name: losses.mean(),
            "_completion_tokens": tokens.detach().float(),  # not "_tokens": no token weighting here
            "_gen_s": torch.tensor(info["generation_s"], device=device),
            "_on_policy": torch.tensor(info["on_policy"], device=device),
        }
