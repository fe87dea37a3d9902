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

from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from kdkit.config.cache import CacheConfig
from kdkit.config.students import StudentRun, unique_student_names
from kdkit.engine.privacy_settings import PrivacyConfig
from kdkit.engine.settings import TrainConfig
from kdkit.settings import StrictModel

Dtype = Literal["float32", "bfloat16", "float16"]


class ArithmeticTeacherConfig(StrictModel):
    """Everything that determines the cached arithmetic teacher; its hash (with the task's text
    format version) names the cache folder (`kdkit.pipelines.teachers.get_arithmetic_teacher`).

    The defaults (3 layers, width 64, ~0.15M parameters, 1500 steps of 32 problems with 1–4 digit
    operands) reach ~97% exact match on 3–4 digits in a few single-thread CPU minutes.
    """

    digits: tuple[PositiveInt, PositiveInt] = (1, 4)
    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 3
    num_heads: PositiveInt = 4
    intermediate_size: PositiveInt = 192
    steps: PositiveInt = 1500
    batch_size: PositiveInt = 32
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    seed: int = 0


class LMTeacherConfig(StrictModel):
    """Where the teacher comes from.

    source: "smollm2" (the offline SmolLM2-135M-Instruct), "arithmetic" (the tiny addition teacher,
    trained on first use and cached; `arithmetic` overrides its `ArithmeticTeacherConfig` fields),
    or a local Hugging Face folder / hub id loaded with `from_pretrained`.
    """

    source: str = "smollm2"
    dtype: Dtype = "float32"
    arithmetic: ArithmeticTeacherConfig | None = None

    @model_validator(mode="after")
    def _arithmetic_fields(self) -> LMTeacherConfig:
        if self.arithmetic is not None and self.source != "arithmetic":
            raise ValueError("teacher.arithmetic settings need source: arithmetic")
        return self


class LMStudentConfig(StrictModel):
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
    def _one_source(self) -> LMStudentConfig:
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


class LMDataConfig(StrictModel):
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
    def _consistent(self) -> LMDataConfig:
        if self.dataset == "jsonl" and self.path is None:
            raise ValueError("dataset jsonl needs a path")
        if self.prompt_tokens >= self.block_size:
            raise ValueError(f"prompt_tokens={self.prompt_tokens} must be < block_size={self.block_size}")
        check_digit_ranges(self)
        return self


def check_digit_ranges(data: Any) -> None:
    """ValueError unless `data.train_digits` and `data.eval_digits` are (min, max) with min <= max."""
    for key in ("train_digits", "eval_digits"):
        low, high = getattr(data, key)
        if low > high:
            raise ValueError(f"{key} must be (min, max) with min <= max, got ({low}, {high})")


class LMStudentRun(StudentRun):
    """One LM student: `{name, method, ...the method's parameters}`; `kdkit methods` lists each
    method's parameters and defaults. The sampler's `sampling_temperature` and the loss's
    `temperature` are separate fields on purpose."""

    kind: ClassVar[str] = "lm"
    method: str

    def needs_teacher(self) -> bool:
        return bool(self.method_class().needs_teacher(self.method_params()))

    def generates(self) -> bool:
        return bool(self.method_class().generates(self.method_params()))


class LMEvalConfig(StrictModel):
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
    teacher: LMTeacherConfig = Field(default_factory=LMTeacherConfig)
    student: LMStudentConfig
    data: LMDataConfig
    students: list[LMStudentRun] = Field(min_length=1)
    caches: dict[str, CacheConfig] = Field(default_factory=dict)  # teacher-logit caches (config/cache.py)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=100, batch_size=8, lr=1e-4))
    eval: LMEvalConfig = Field(default_factory=LMEvalConfig)
    output_dir: str = "runs"
    # DP-SGD for every student (kdkit.engine.private): σ or a target ε, clipping norm, accountant;
    # only methods whose loss is a mean of per-example losses can run under it (dp_opd, dp_kd, dp_ft)
    privacy: PrivacyConfig | None = None
    # torch CPU threads (None: torch's default). On a CPU shared with other work, 1 thread avoids
    # oversubscription and was ~2x faster than 2 on a loaded 2-core machine.
    threads: PositiveInt | None = None

    _unique_names = field_validator("students")(unique_student_names)

    @model_validator(mode="after")
    def _known_caches(self) -> LMRunConfig:
        for student in self.students:
            name = (student.model_extra or {}).get("cache")
            if name and name not in self.caches and "/" not in name and "\\" not in name:
                known = ", ".join(self.caches) or "none"
                raise ValueError(
                    f"student {student.name!r}: cache {name!r} is neither one of this run's caches "
                    f"({known}) nor a folder path"
                )
        return self

    @model_validator(mode="after")
    def _private_methods(self) -> LMRunConfig:
        per_example = {s.name: bool(getattr(s.method_class(), "per_example", False)) for s in self.students}
        if self.privacy is not None:
            others = [f"{s.name} ({s.method})" for s in self.students if not per_example[s.name]]
            if others:
                raise ValueError(
                    f"privacy: students {others} use methods whose loss is normalised over the whole batch "
                    "(one example's gradient then depends on the others), which DP-SGD cannot clip per "
                    "example; use dp_opd, dp_kd or dp_ft"
                )
        else:
            private = [f"{s.name} ({s.method})" for s in self.students if per_example[s.name]]
            if private:
                raise ValueError(f"students {private} are DP-SGD methods: add a privacy: section "
                                 "(e.g. privacy: {target_epsilon: 2.0}), or use on_policy / gkd / "
                                 "supervised_kd for the same loss without privacy")
        return self

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
    "ArithmeticTeacherConfig",
    "LMDataConfig",
    "LMEvalConfig",
    "LMRunConfig",
    "LMStudentConfig",
    "LMStudentRun",
    "LMTeacherConfig",
    "check_digit_ranges",
]
