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
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PositiveInt, field_validator, model_validator
from torch import Tensor, nn

from kdkit.engine.distiller import Distiller, freeze
from kdkit.losses import DIVERGENCES
from kdkit.losses.policy import clipped_policy_loss, group_advantages, reinforce_loss
from kdkit.losses.tokens import shift, token_log_probs
from kdkit.methods.base import LMMethod, LMParts
from kdkit.objectives.lm import DivergenceParams, completion_cross_entropy, token_divergence
from kdkit.registry import METHODS, REWARDS
from kdkit.rewards import RewardInputs, TeacherLogLikelihoodReward
from kdkit.samplers.base import GenerationParams, generation_settings
from kdkit.samplers.generation import GenerationSettings, generate_batch
from kdkit.settings import LMContext

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
        # validated now (unknown divergence or parameter: an error at construction, not at step 1)
        self.divergence_params = DivergenceParams.model_validate(
            {"divergence": divergence, "temperature": temperature, **(divergence_kwargs or {})}
        )
        self.reward, self.tokenizer, self.estimator = reward, tokenizer, estimator
        self.group_size = group_size
        generation = generation or GenerationSettings(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        # G samples per prompt share one prompt prefill; rows i*G .. i*G+G-1 belong to prompt i
        self.generation = replace(generation, num_samples=group_size)
        self.clip_eps, self.clip_eps_high = clip_eps, clip_eps_high
        self.kl_coef, self.scale_advantages, self.normalisation = kl_coef, scale_advantages, normalisation
        self.gamma, self.num_iterations = gamma, num_iterations
        self.pg_weight, self.kd_weight, self.ce_weight = pg_weight, kd_weight, ce_weight
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
        sampled, info = generate_batch(
            self.student, batch["prompt_ids"], batch["prompt_attention_mask"], self.generation
        )
        prompt_ids, prompt_mask = sampled["prompt_ids"], sampled["prompt_attention_mask"]  # repeated G times
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
            raw["kd"] = token_divergence(logits, teacher_logits, labels, self.divergence_params)
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


class PolicyParams(DivergenceParams, GenerationParams):
    """Parameters of the policy-gradient methods, flat as a config writes them.

    reward: a `REWARDS` entry; its own parameters are written flat beside it (`reward: checker,
    task: arithmetic`) and checked against what that entry declares (`reward_params`).
    group_size: samples per prompt (G). clip_eps / clip_eps_high / kl_coef / scale_advantages /
    normalisation / num_iterations: see `PolicyGradientDistiller`. gamma: REINFORCE's discount.
    pg_weight / kd_weight / ce_weight: the policy-gradient term, the distillation term (the
    `divergence` to the teacher on the same samples, at distillation `temperature`), and
    cross-entropy on the dataset's completions.
    """

    nested_params: ClassVar[dict[str, tuple[str, Any]]] = {
        "divergence_params": ("divergence", DIVERGENCES),
        "reward_params": ("reward", REWARDS),
    }

    reward: str = "checker"
    reward_params: dict[str, Any] = Field(default_factory=dict)
    group_size: PositiveInt = 4
    clip_eps: float = Field(0.2, ge=0.0)
    clip_eps_high: float | None = Field(None, ge=0.0)
    kl_coef: float = Field(0.0, ge=0.0)
    scale_advantages: bool = True
    normalisation: Literal["token", "sequence"] = "token"
    num_iterations: PositiveInt = 1
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    pg_weight: float = Field(1.0, ge=0.0)
    kd_weight: float = Field(0.0, ge=0.0)
    ce_weight: float = Field(0.0, ge=0.0)
    divergence: str = "rkl"

    @field_validator("reward")
    @classmethod
    def _known_reward(cls, value: str) -> str:
        return REWARDS.canonical(value)

    @model_validator(mode="after")
    def _checked(self) -> PolicyParams:
        self.__dict__["reward_params"] = REWARDS.check_params(self.reward, self.reward_params)
        if self.pg_weight == 0 and self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("pg_weight, kd_weight and ce_weight are all 0: nothing to train")
        return self


class GRPOParams(PolicyParams):
    @model_validator(mode="after")
    def _groups(self) -> GRPOParams:
        if self.group_size < 2:
            raise ValueError("GRPO compares samples within a group: group_size must be >= 2")
        return self


class ReinforceParams(PolicyParams):
    reward: str = "teacher_loglik"
    group_size: PositiveInt = 1


class _PolicyMethod(LMMethod):
    """An LM method trained by policy gradient on the student's own samples (see the module)."""

    estimator: ClassVar[Estimator] = "grpo"

    @classmethod
    def parts(cls, params: Any) -> LMParts:
        return LMParts("student", f"reward {params.reward}", cls.estimator)

    @classmethod
    def needs_teacher(cls, params: Any) -> bool:
        return bool(params.kd_weight > 0 or REWARDS.get(params.reward).needs_teacher)

    @classmethod
    def generates(cls, params: Any) -> bool:
        return True

    @classmethod
    def build(cls, params: Any, student: Any, teacher: Any, ctx: LMContext, **options: Any) -> Any:
        """The distiller; `options` (e.g. tokenizers) are accepted for the common build signature."""
        reward = REWARDS.get(params.reward)(**params.reward_params)
        return PolicyGradientDistiller(
            student,
            teacher if cls.needs_teacher(params) else None,
            reward=reward,
            tokenizer=ctx.tokenizer,
            estimator=cls.estimator,
            group_size=params.group_size,
            generation=generation_settings(params, ctx),
            clip_eps=params.clip_eps,
            clip_eps_high=params.clip_eps_high,
            kl_coef=params.kl_coef,
            scale_advantages=params.scale_advantages,
            normalisation=params.normalisation,
            gamma=params.gamma,
            num_iterations=params.num_iterations,
            pg_weight=params.pg_weight,
            kd_weight=params.kd_weight,
            ce_weight=params.ce_weight,
            divergence=params.divergence,
            divergence_kwargs=params.divergence_params,
            temperature=params.temperature,
        )


@METHODS.register(
    "grpo",
    "GRPO: G student samples per prompt, group-normalised rewards (any REWARDS entry), clipped PG; "
    "kd_weight > 0 adds a divergence to the teacher on the same samples",
)
class GRPO(_PolicyMethod):
    Params = GRPOParams
    estimator = "grpo"


@METHODS.register(
    "reinforce",
    "REINFORCE on student samples with per-token reward log p_T(y_t) (reward-to-go, mean baseline)",
)
class Reinforce(_PolicyMethod):
    Params = ReinforceParams
    estimator = "reinforce"


__all__ = [
    "GRPO",
    "GRPOParams",
    "PolicyGradientDistiller",
    "PolicyParams",
    "Reinforce",
    "ReinforceParams",
]
