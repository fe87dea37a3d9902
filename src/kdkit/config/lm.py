"""The run config of `kind: lm`: one causal-LM teacher, one student shape, several students each
trained with a named LM method (optionally with some of its fields overridden) on the same budget.

```yaml
kind: lm
name: smollm2-python-docs-cpu
teacher: {source: smollm2}                      # or: arithmetic, a local folder, a hub id
student: {keep_layers: "every_k:3"}             # derived from the teacher's layers
data: {dataset: python_docs, block_size: 128, prompt_tokens: 32, max_tokens: 200000}
students:
  - {name: fkl, method: supervised_kd}
  - {name: gkd, method: gkd, lmbda: 0.5, sampling_temperature: 1.0, temperature: 1.0}
train: {steps: 60, batch_size: 4, lr: 1e-4}
```

`sampling_temperature` (which sequences an on-policy sampler draws) and `temperature` (the
distillation temperature of the loss) are separate fields on purpose: reusing one for the other
is a classic bug of other toolkits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from kdkit.config.train import StrictModel, TrainConfig, unique_student_names
from kdkit.registry import METHODS

Dtype = Literal["float32", "bfloat16", "float16"]
#: Samplers that generate completions from prompts (need prompt tokens in every sample).
GENERATING_SAMPLERS = ("teacher", "student", "mixture", "student_teacher")


def lm_method_names() -> list[str]:
    """Names of the registered LM recipes (METHODS also holds classifier recipes)."""
    from kdkit.methods.lm import LMRecipe  # registers the LM recipes on import

    return [name for name, _, recipe in METHODS.items() if isinstance(recipe, LMRecipe)]


def lm_recipe(name: str) -> Any:
    """The `LMRecipe` registered as `name`; ValueError listing the LM methods otherwise."""
    from kdkit.methods.lm import LMRecipe

    known = ", ".join(lm_method_names())
    if name not in METHODS:
        raise ValueError(f"{name!r} is not a method (known: {known})")
    recipe = METHODS.get(name)
    if not isinstance(recipe, LMRecipe):
        raise ValueError(f"{name!r} is not a language-model method (known: {known})")
    return recipe


def _arithmetic_teacher_fields() -> list[str]:
    from kdkit.tasks.arithmetic import ArithmeticTeacherConfig

    return [f.name for f in dataclasses.fields(ArithmeticTeacherConfig) if f.name != "format_version"]


class TeacherConfig(StrictModel):
    """Where the teacher comes from.

    source: "smollm2" (the offline SmolLM2-135M-Instruct), "arithmetic" (the tiny addition teacher,
    trained on first use and cached; `arithmetic` overrides its `ArithmeticTeacherConfig` fields),
    or a local Hugging Face folder / hub id loaded with `from_pretrained`.
    """

    source: str = "smollm2"
    dtype: Dtype = "float32"
    arithmetic: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _arithmetic_fields(self) -> TeacherConfig:
        if self.arithmetic and self.source != "arithmetic":
            raise ValueError("teacher.arithmetic settings need source: arithmetic")
        known = _arithmetic_teacher_fields()
        unknown = sorted(set(self.arithmetic) - set(known))
        if unknown:
            raise ValueError(f"unknown arithmetic teacher field(s) {unknown} (known: {', '.join(known)})")
        return self


class StudentConfig(StrictModel):
    """The student's shape, given exactly one way:

    keep_layers: derive from the teacher by layer selection ("every_k:3", a number of evenly
        spaced layers, or explicit indices), optionally with a narrower `intermediate_size`;
        `copy_weights: false` keeps the derived shape but starts from random weights.
    path: a local folder / hub id of a model sharing the teacher's tokenizer.
    config: a transformers config dict with `model_type` (e.g. {model_type: llama, hidden_size: 64,
        ...}); vocab_size and the special token ids default to the teacher's.
    """

    keep_layers: str | int | list[int] | None = None
    intermediate_size: PositiveInt | None = None
    copy_weights: bool = True
    path: str | None = None
    config: dict[str, Any] | None = None
    dtype: Dtype = "float32"  # master weights; bf16 compute comes from train.mixed_precision
    seed: int = 0  # initialisation of config-built or copy_weights=false students

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        given = [k for k in ("keep_layers", "path", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of keep_layers (derive from the teacher), path, or config; "
                f"got {given or 'none'}"
            )
        if self.intermediate_size is not None and self.keep_layers is None:
            raise ValueError("intermediate_size applies to a student derived with keep_layers")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("student.config needs a model_type (e.g. llama)")
        return self


class DataConfig(StrictModel):
    """Training and held-out data.

    python_docs: the Python 3.11 docs as token blocks of `block_size`; the first `prompt_tokens`
        of each block are the prompt (no loss; what on-policy samplers continue). `max_tokens` /
        `max_files` cap the training split, `eval_max_tokens` the held-out split.
    arithmetic: `train_size` addition problems with operand lengths in `train_digits`; held-out
        problems use `eval_digits` (may be longer than the training range, to show exposure bias).
    jsonl: records (plain text, prompt/completion or chat; see `kdkit.data.text`) from `path`;
        held-out records from `eval_path`, else the last `eval_size` records of `path`.
    eval_size: held-out samples used for perplexity, agreement and sampling.
    """

    dataset: Literal["python_docs", "arithmetic", "jsonl"]
    # python_docs
    root: str | None = None
    block_size: PositiveInt = 128
    prompt_tokens: int = Field(32, ge=0)
    max_files: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    eval_max_tokens: PositiveInt | None = 40_000
    # arithmetic
    train_size: PositiveInt = 20_000
    train_digits: tuple[PositiveInt, PositiveInt] = (1, 4)
    eval_digits: tuple[PositiveInt, PositiveInt] = (1, 5)
    # jsonl
    path: str | None = None
    eval_path: str | None = None
    max_length: PositiveInt | None = None
    # all
    eval_size: PositiveInt = 128
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.dataset == "jsonl" and self.path is None:
            raise ValueError("dataset jsonl needs a path")
        if self.prompt_tokens >= self.block_size:
            raise ValueError(f"prompt_tokens={self.prompt_tokens} must be < block_size={self.block_size}")
        for key in ("train_digits", "eval_digits"):
            low, high = getattr(self, key)
            if low > high:
                raise ValueError(f"{key} must be (min, max) with min <= max, got ({low}, {high})")
        return self


class StudentRun(StrictModel):
    """One student: a registered LM method and any of its fields overridden.

    Unset fields keep the method's defaults (`kdkit methods` lists them). `fused`, `chunk_size`,
    `advantage_coef` and `is_clip` are options of the distiller itself.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    method: str
    # LMRecipe fields (None = the method's default)
    sampler: Literal["dataset", "teacher", "student", "mixture", "student_teacher"] | None = None
    lmbda: float | None = Field(None, ge=0.0, le=1.0)
    objective: Literal["divergence", "sampled_token"] | None = None
    divergence: str | None = None
    divergence_kwargs: dict[str, Any] | None = None
    temperature: PositiveFloat | None = None  # distillation temperature of the loss
    kd_weight: float | None = Field(None, ge=0.0)
    ce_weight: float | None = Field(None, ge=0.0)
    gamma: float | None = Field(None, ge=0.0, le=1.0)
    sampling_temperature: float | None = Field(None, ge=0.0)  # 0 = greedy; the sampler's, not the loss's
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_new_tokens: PositiveInt | None = None
    # LMDistiller options
    fused: bool = False
    chunk_size: PositiveInt | None = None
    advantage_coef: PositiveFloat = 1.0
    is_clip: PositiveFloat = 5.0

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        lm_recipe(value)
        return value

    @field_validator("divergence")
    @classmethod
    def _known_divergence(cls, value: str | None) -> str | None:
        if value is not None:
            from kdkit.losses import DIVERGENCES

            DIVERGENCES.canonical(value)  # UnknownNameError is a ValueError naming the known ones
        return value

    @model_validator(mode="after")
    def _trainable(self) -> StudentRun:
        recipe = self.recipe()
        if recipe.kd_weight == 0 and recipe.ce_weight == 0:
            raise ValueError(f"student {self.name!r}: kd_weight and ce_weight are both 0, nothing to train")
        if self.fused and recipe.objective != "divergence":
            raise ValueError(f"student {self.name!r}: fused works with objective 'divergence' only")
        return self

    def overrides(self) -> dict[str, Any]:
        """The recipe fields this entry sets explicitly."""
        recipe_fields = {f.name for f in dataclasses.fields(lm_recipe(self.method))}
        # None means "the method's default" (also after a round trip through config.json)
        given = {k: v for k, v in self.model_dump().items() if k in recipe_fields and v is not None}
        if "divergence" in given and "divergence_kwargs" not in given:
            # the method's kwargs belong to its own divergence (e.g. gkd's beta to jsd)
            given["divergence_kwargs"] = {}
        return given

    def recipe(self) -> Any:
        """The method's `LMRecipe` with this entry's overrides applied."""
        return lm_recipe(self.method).replace(**self.overrides())

    def distiller_options(self) -> dict[str, Any]:
        return {
            "fused": self.fused,
            "chunk_size": self.chunk_size,
            "advantage_coef": self.advantage_coef,
            "is_clip": self.is_clip,
        }

    def needs_teacher(self) -> bool:
        return self.recipe().kd_weight > 0 or self.recipe().sampler in ("teacher", "student_teacher")

    def generates(self) -> bool:
        recipe = self.recipe()
        never_samples = recipe.sampler == "mixture" and recipe.lmbda == 0
        return recipe.sampler in GENERATING_SAMPLERS and not never_samples


class EvalConfig(StrictModel):
    """Held-out evaluation. Samples for the teacher-likelihood estimate are drawn from the first
    `samples` held-out prompts at `sampling_temperature` (1.0 = the model's own distribution, which
    makes E[log p_S − log p_T] an estimate of KL(p_S ‖ p_T) per token)."""

    batch_size: PositiveInt = 16
    samples: int = Field(32, ge=0)
    sampling_temperature: float = Field(1.0, ge=0.0)
    max_new_tokens: PositiveInt = 64
    exact_match_problems: int = Field(500, ge=0)  # arithmetic only: problems over eval_digits
    seed: int = 0


class LMRunConfig(StrictModel):
    """A whole language-model distillation run; `kind` is the discriminator of kdkit's run configs."""

    kind: Literal["lm"] = "lm"
    name: str = Field("lm", pattern=r"^[A-Za-z0-9_.-]+$")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig
    data: DataConfig
    students: list[StudentRun] = Field(min_length=1)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=100, batch_size=8, lr=1e-4))
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = "runs"
    # torch CPU threads (None: torch's default). On a CPU shared with other work, 1 thread avoids
    # oversubscription and was ~2x faster than 2 on a loaded 2-core machine.
    threads: PositiveInt | None = None

    _unique_names = field_validator("students")(unique_student_names)

    @model_validator(mode="after")
    def _prompts_for_generation(self) -> LMRunConfig:
        if self.data.dataset == "python_docs" and self.data.prompt_tokens == 0:
            generating = [s.name for s in self.students if s.generates()]
            if generating:
                raise ValueError(
                    f"students {generating} sample completions and need prompts: set data.prompt_tokens > 0"
                )
        return self


__all__ = [
    "DataConfig",
    "EvalConfig",
    "LMRunConfig",
    "StudentConfig",
    "StudentRun",
    "TeacherConfig",
    "lm_method_names",
    "lm_recipe",
]
