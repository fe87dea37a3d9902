"""RL-based distillation on kdkit's engine: GRPO with any reward, REINFORCE with log p_T, and both
composed with on-policy distillation terms in one objective.

One `PolicyGradientDistiller` runs, inside its forward (so the engine loop never changes):

1. sampling: each prompt of the batch is repeated `group_size` times and the *current* student
   samples one completion per copy (KV cache, no grad, eval mode; `kdkit.samplers.generate_batch`);
2. rewards: the completions are decoded and scored by a reward from `kdkit.rewards` (a judge's
   verdict, the task's checker, the teacher's log-likelihood, or any callable on `RewardInputs`);
3. the objective, each term weighted and logged on its own:
   - "pg": estimator "grpo" — group-normalised advantages (`group_advantages`) and the clipped
     objective (`clipped_policy_loss`) with an optional k3 KL penalty to a frozen reference;
     estimator "reinforce" — per-token rewards (the teacher's log-probs of the sampled tokens by
     default) and REINFORCE with reward-to-go and a mean baseline (`reinforce_loss`);
   - "kd" (optional, `kd_weight > 0`): a token divergence from `kdkit.losses.DIVERGENCES` between
     the teacher and the student on the very same samples (e.g. reverse KL: on-policy distillation);
   - "ce" (optional): cross-entropy on the dataset's completions of the batch (a supervised anchor).

Sample reuse: with `num_iterations` μ > 1 the same rollouts (and their behaviour log-probs, taken
at sampling time) are trained on for μ consecutive optimizer steps, so the importance ratio and the
clip are active; μ = 1 (default, as TRL's GRPOTrainer) makes the ratio exactly 1.

Diagnostics ("_" keys, logged as diag/...): mean/std reward, the share of groups whose rewards all
tie (no signal), generation and reward seconds, clip fraction, KL to the reference, the unweighted
term values, and the number of sampled tokens the terms are means over (`_tokens`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdkit.engine.distiller import Distiller, freeze
from kdkit.losses.policy import clipped_policy_loss, group_advantages, reinforce_loss
from kdkit.methods.lm_objectives import completion_cross_entropy, shift, token_divergence, token_log_probs
from kdkit.registry import METHODS
from kdkit.rewards import RewardInputs, TeacherLogLikelihoodReward
from kdkit.samplers.generation import GenerationSettings, generate_batch

Estimator = Literal["grpo", "reinforce"]


def _decode(tokenizer: Any, ids: Tensor, mask: Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True) for row, m in zip(ids, mask)]


class PolicyGradientDistiller(Distiller):
    """A student trained by policy gradient on its own samples, optionally distilled on them too.

    reward: a callable `RewardInputs -> [N] float` (see `kdkit.rewards`); for estimator="reinforce"
        an object with `token_rewards(inputs) -> [N, T-1]` (default: the teacher's log-probs).
    tokenizer: the student's tokenizer (prompts and completions are decoded for text rewards).
    group_size: G samples per prompt (GRPO needs ≥ 2; REINFORCE may use 1).
    generation: sampling settings (temperature is the *sampling* temperature).
    clip_eps / clip_eps_high, kl_coef, scale_advantages, normalisation: see `clipped_policy_loss`
        and `group_advantages`. kl_coef > 0 keeps a frozen copy of the initial student as reference.
    gamma: REINFORCE's discount of the reward-to-go.
    pg_weight, kd_weight, ce_weight: weights of the "pg", "kd" and "ce" terms.
    divergence / divergence_kwargs / temperature: the "kd" term (needs a teacher).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        reward: Callable[[RewardInputs], Tensor] | None = None,
        tokenizer: Any = None,
        estimator: Estimator = "grpo",
        group_size: int = 4,
        generation: GenerationSettings | None = None,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        kl_coef: float = 0.0,
        scale_advantages: bool = True,
        normalisation: str = "token",
        gamma: float = 1.0,
        num_iterations: int = 1,
        pg_weight: float = 1.0,
        kd_weight: float = 0.0,
        ce_weight: float = 0.0,
        divergence: str = "rkl",
        divergence_kwargs: dict[str, Any] | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(student, teacher)
        if estimator not in ("grpo", "reinforce"):
            raise ValueError(f"estimator must be 'grpo' or 'reinforce', got {estimator!r}")
        if estimator == "grpo" and group_size < 2:
            raise ValueError("GRPO compares samples within a group: group_size must be >= 2")
        if group_size < 1 or num_iterations < 1:
            raise ValueError(
                f"group_size and num_iterations must be >= 1, got {group_size}, {num_iterations}"
            )
        if reward is None:
            if estimator == "grpo":
                raise ValueError("GRPO needs a reward (e.g. kdkit.rewards.CheckerReward or JudgeReward)")
            reward = TeacherLogLikelihoodReward()
        if estimator == "reinforce" and not hasattr(reward, "token_rewards"):
            raise ValueError("estimator='reinforce' needs a reward with token_rewards() (per-token rewards)")
        if (kd_weight > 0 or isinstance(reward, TeacherLogLikelihoodReward)) and teacher is None:
            raise ValueError("this objective reads the teacher (kd_weight > 0 or a teacher reward): pass one")
        if pg_weight == 0 and kd_weight == 0 and ce_weight == 0:
            raise ValueError("pg_weight, kd_weight and ce_weight are all 0: nothing to train")
        if tokenizer is None:
            raise ValueError("the student's tokenizer is needed to decode samples for the reward")
        if kd_weight > 0:
            from kdkit.losses import DIVERGENCES

            DIVERGENCES.get(divergence)
        self.reward, self.tokenizer, self.estimator = reward, tokenizer, estimator
        self.group_size = group_size
        self.generation = generation or GenerationSettings(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        self.clip_eps, self.clip_eps_high = clip_eps, clip_eps_high
        self.kl_coef, self.scale_advantages, self.normalisation = kl_coef, scale_advantages, normalisation
        self.gamma, self.num_iterations = gamma, num_iterations
        self.pg_weight, self.kd_weight, self.ce_weight = pg_weight, kd_weight, ce_weight
        self.divergence, self.divergence_kwargs = divergence, dict(divergence_kwargs or {})
        self.temperature = temperature
        # a frozen copy of the initial student, outside the module tree like the teacher
        self._reference: list[nn.Module] = [freeze(copy.deepcopy(student))] if kl_coef > 0 else []
        self._rollout: dict[str, Any] | None = None
        self._calls = 0

    def move_teacher(self, device: torch.device | str) -> None:
        super().move_teacher(device)
        if self._reference:
            self._reference[0] = freeze(self._reference[0].to(device))

    # ------------------------------------------------------------------ sampling and rewards

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> dict[str, Any]:
        """G samples per prompt, their rewards and behaviour log-probs (see the module docstring)."""
        prompt_ids = batch["prompt_ids"].repeat_interleave(self.group_size, 0)
        prompt_mask = batch["prompt_attention_mask"].repeat_interleave(self.group_size, 0)
        sampled, info = generate_batch(self.student, prompt_ids, prompt_mask, self.generation)
        labels = sampled["labels"]
        completion_mask = labels != -100
        started = time.perf_counter()
        inputs = RewardInputs(
            prompts=_decode(self.tokenizer, prompt_ids, prompt_mask),
            completions=_decode(self.tokenizer, sampled["input_ids"], completion_mask),
            batch=sampled,
            teacher=self.teacher,
        )
        out: dict[str, Any] = {
            "batch": sampled,
            "generation_s": info["generation_s"],
            "truncated": info["truncated"],
        }
        if self.estimator == "grpo":
            rewards = self.reward(inputs).float().to(labels.device)
            out["rewards"] = rewards
            out["advantages"] = group_advantages(rewards, self.group_size, scale=self.scale_advantages)
        else:
            token_rewards = self.reward.token_rewards(inputs).float()  # type: ignore[attr-defined]
            out["token_rewards"] = token_rewards
            count = (labels[:, 1:] != -100).sum(1).clamp_min(1)
            out["rewards"] = token_rewards.sum(1) / count  # per-token mean, for logging
        out["reward_s"] = time.perf_counter() - started
        if self.num_iterations > 1:  # behaviour log-probs, for the ratio on later iterations
            logits = self.student(
                input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]
            ).logits
            shifted, targets, _ = shift(logits, labels)
            out["old_log_probs"] = token_log_probs(shifted, targets)
        return out

    # ------------------------------------------------------------------ forward

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        fresh = self._rollout is None or self._calls % self.num_iterations == 0 or not self.training
        if fresh:
            self._rollout = self.rollout(batch)
        rollout = self._rollout
        assert rollout is not None
        if self.training:
            self._calls += 1
        sampled = rollout["batch"]
        labels = sampled["labels"]
        logits = self.student(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]).logits
        shifted, targets, mask = shift(logits, labels)
        log_probs = token_log_probs(shifted, targets)
        raw: dict[str, Tensor] = {}
        info: dict[str, Tensor] = {}
        if self.pg_weight > 0:
            if self.estimator == "grpo":
                old = rollout.get("old_log_probs", log_probs.detach())
                reference = None
                if self._reference:
                    with torch.no_grad():
                        ref_logits = self._reference[0](
                            input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]
                        ).logits
                        reference = token_log_probs(shift(ref_logits, labels)[0], targets)
                raw["pg"], info = clipped_policy_loss(
                    log_probs,
                    old,
                    rollout["advantages"],
                    mask,
                    clip_eps=self.clip_eps,
                    clip_eps_high=self.clip_eps_high,
                    ref_log_probs=reference,
                    kl_coef=self.kl_coef,
                    normalisation=self.normalisation,
                )
            else:
                raw["pg"], info = reinforce_loss(
                    log_probs,
                    rollout["token_rewards"].to(log_probs.device),
                    mask,
                    gamma=self.gamma,
                    normalisation=self.normalisation,
                )
        if self.kd_weight > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(  # type: ignore[misc]
                    input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]
                ).logits
            raw["kd"] = token_divergence(
                logits,
                teacher_logits,
                labels,
                divergence=self.divergence,
                temperature=self.temperature,
                **self.divergence_kwargs,
            )
        if self.ce_weight > 0:
            dataset_logits = self.student(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            raw["ce"] = completion_cross_entropy(dataset_logits, batch["labels"])
        weights = {"pg": self.pg_weight, "kd": self.kd_weight, "ce": self.ce_weight}
        terms = {name: weights[name] * value for name, value in raw.items()}
        return terms | self._diagnostics(raw, info, rollout, mask, fresh)

    def _diagnostics(
        self,
        raw: dict[str, Tensor],
        info: dict[str, Tensor],
        rollout: dict[str, Any],
        mask: Tensor,
        fresh: bool,
    ) -> dict[str, Tensor]:
        def value(x: float | Tensor) -> Tensor:
            return torch.as_tensor(x, dtype=torch.float32).detach().reshape(()).to(mask.device)

        rewards = rollout["rewards"].float()
        out = {f"_{name}_raw": value(v) for name, v in raw.items()}
        out |= {f"_{name}": value(v) for name, v in info.items() if name in ("clip_fraction", "kl", "ratio")}
        out["_reward"] = value(rewards.mean())
        out["_reward_std"] = value(rewards.std() if rewards.numel() > 1 else 0.0)
        if self.estimator == "grpo":
            grouped = rewards.view(-1, self.group_size)
            out["_tied_groups"] = value((grouped.max(1).values == grouped.min(1).values).float().mean())
        out["_tokens"] = value(float(mask.sum()))
        out["_gen_s"] = value(rollout["generation_s"] if fresh else 0.0)
        out["_reward_s"] = value(rollout["reward_s"] if fresh else 0.0)
        out["_truncated"] = value(rollout["truncated"])
        return out


# ---------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class PolicyRecipe:
    """Defaults of a named policy-gradient method; `build` makes the distiller.

    Unlike the plain LM recipes these need a reward object and the student's tokenizer at build time.
    """

    estimator: Estimator = "grpo"
    group_size: int = 4
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    scale_advantages: bool = True
    gamma: float = 1.0
    pg_weight: float = 1.0
    kd_weight: float = 0.0
    divergence: str = "rkl"
    divergence_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling_temperature: float = 1.0
    max_new_tokens: int = 64

    def replace(self, **overrides: Any) -> PolicyRecipe:
        return replace(self, **overrides)

    def build(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        tokenizer: Any,
        reward: Any = None,
        **options: Any,
    ) -> PolicyGradientDistiller:
        generation = GenerationSettings(
            temperature=self.sampling_temperature,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return PolicyGradientDistiller(
            student,
            teacher,
            reward=reward,
            tokenizer=tokenizer,
            estimator=self.estimator,
            group_size=self.group_size,
            generation=generation,
            clip_eps=self.clip_eps,
            kl_coef=self.kl_coef,
            scale_advantages=self.scale_advantages,
            gamma=self.gamma,
            pg_weight=self.pg_weight,
            kd_weight=self.kd_weight,
            divergence=self.divergence,
            divergence_kwargs=self.divergence_kwargs,
            **options,
        )


POLICY_RECIPES: dict[str, tuple[PolicyRecipe, str]] = {
    "grpo": (
        PolicyRecipe(estimator="grpo"),
        "GRPO: G student samples per prompt, group-normalised rewards (any reward), clipped PG",
    ),
    "grpo_rkl": (
        PolicyRecipe(estimator="grpo", kd_weight=1.0, divergence="rkl"),
        "GRPO reward + on-policy reverse KL to the teacher on the same samples, weighted and logged apart",
    ),
    "reinforce_teacher": (
        PolicyRecipe(estimator="reinforce", group_size=1, gamma=1.0),
        "REINFORCE with per-token reward log p_T(y_t) (reward-to-go, mean baseline) on student samples",
    ),
}

for _name, (_recipe, _description) in POLICY_RECIPES.items():
    METHODS.add(_name, _recipe, _description)


__all__ = ["POLICY_RECIPES", "PolicyGradientDistiller", "PolicyRecipe"]
