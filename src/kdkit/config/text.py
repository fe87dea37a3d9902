"""The run config of `kind: text`: distillation from a teacher reached only as text (an API, a
local generator, vLLM), with the black-box methods of kind "text" (text_seqkd, soda, gen_ssd).

```yaml
kind: text
name: arithmetic-api
teacher:
  api: {base_url: "https://api.example.com/v1", model: big-model, api_key_env: EXAMPLE_API_KEY}
  # or  local: {source: arithmetic}      (a kdkit LM teacher, generating locally)
  # or  vllm: {model: /models/big}       (where vllm and a GPU are present)
student: {config: {model_type: llama, hidden_size: 64, ...}, tokenizer: arithmetic}
data: {dataset: arithmetic, train_size: 256, train_digits: [1, 3], eval_digits: [1, 4]}
students:
  - {name: seqkd, method: text_seqkd, steps: 200, teacher_temperature: 0.7}
  - {name: soda, method: soda, warmup_steps: 200, dpo_steps: 100}
```

The API key is read from the environment variable named by `api_key_env` when the teacher is built;
the config (and so config.json, the report) holds only the variable's name.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveFloat, PositiveInt, ValidationInfo, field_validator, model_validator

from kdkit.config.lm import LMStudentConfig, LMTeacherConfig, check_digit_ranges
from kdkit.config.students import StudentRun, unique_student_names
from kdkit.settings import StrictModel


class APITeacherConfig(StrictModel):
    """An OpenAI-compatible endpoint (`kdkit.teachers.OpenAITeacher`); api_key_env names the
    environment variable holding the key (None: no key, e.g. a local vLLM server)."""

    base_url: str = Field(pattern=r"^https?://")
    model: str
    api: Literal["completions", "chat"] = "completions"
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    max_concurrency: PositiveInt = 8
    timeout_s: PositiveFloat = 60.0
    max_retries: int = Field(6, ge=0)
    requests_per_minute: PositiveFloat | None = None


class LocalTextTeacherConfig(LMTeacherConfig):
    """A kdkit LM teacher (source: smollm2, arithmetic, or a folder / hub id) generating locally in
    batches of `batch_size` (`kdkit.teachers.HFTeacher`)."""

    batch_size: PositiveInt = 64


class VLLMTeacherConfig(StrictModel):
    """A model served in-process by vLLM (`kdkit.teachers.VLLMTeacher`); `engine` is passed to
    `vllm.LLM` (e.g. {gpu_memory_utilization: 0.8})."""

    model: str
    engine: dict[str, Any] = Field(default_factory=dict)


class TextTeacherConfig(StrictModel):
    """The teacher, given exactly one way: api, local or vllm."""

    api: APITeacherConfig | None = None
    local: LocalTextTeacherConfig | None = None
    vllm: VLLMTeacherConfig | None = None

    @model_validator(mode="after")
    def _one_form(self) -> TextTeacherConfig:
        given = [k for k in ("api", "local", "vllm") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of api, local or vllm; got {' and '.join(given) or 'none'}")
        return self

    @property
    def form(self) -> str:
        return next(k for k in ("api", "local", "vllm") if getattr(self, k) is not None)


class TextStudentConfig(LMStudentConfig):
    """The student's shape (see `LMStudentConfig`). keep_layers needs a local teacher (it copies the
    teacher's layers). tokenizer: for a `config` student without a local teacher, "arithmetic" (the
    arithmetic task's character tokenizer) or a tokenizer folder / hub id."""

    tokenizer: str | None = None


class TextDataConfig(StrictModel):
    """Training prompts and held-out data.

    arithmetic: `train_size` addition prompts with operand lengths in `train_digits`; held-out
        problems (reference worked solutions) use `eval_digits`.
    jsonl: records {"prompt"[, "completion"]} from `path`; held-out records from `eval_path`, else
        the last `eval_size` records of `path`. Held-out completions give a perplexity.
    """

    dataset: Literal["arithmetic", "jsonl"]
    train_size: PositiveInt = 512
    train_digits: tuple[PositiveInt, PositiveInt] = (1, 3)
    eval_digits: tuple[PositiveInt, PositiveInt] = (1, 4)
    path: str | None = None
    eval_path: str | None = None
    eval_size: PositiveInt = 64
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> TextDataConfig:
        if self.dataset == "jsonl" and self.path is None:
            raise ValueError("dataset jsonl needs a path")
        check_digit_ranges(self)
        return self


class TextStudentRun(StudentRun):
    """One student: `{name, method: text_seqkd | soda | gen_ssd, ...the method's parameters}`."""

    kind: ClassVar[str] = "text"
    method: str


class TextEvalConfig(StrictModel):
    """Held-out evaluation: perplexity of reference completions, exact match (arithmetic: greedy, on
    `exact_match_problems` problems over eval_digits), and `samples` greedy generations shown in
    the report."""

    batch_size: PositiveInt = 64
    exact_match_problems: int = Field(500, ge=0)
    samples: int = Field(3, ge=0)
    max_new_tokens: PositiveInt = 64


class TextRunConfig(StrictModel):
    """A whole black-box distillation run: one text teacher, one student shape, several students."""

    kind: Literal["text"] = "text"
    name: str = Field("text", pattern=r"^[A-Za-z0-9_.-]+$")
    teacher: TextTeacherConfig
    student: TextStudentConfig
    data: TextDataConfig
    students: list[TextStudentRun] = Field(min_length=1)
    eval: TextEvalConfig = Field(default_factory=TextEvalConfig)
    seed: int = 0  # torch's seed before each student's run (sampling streams); weights: student.seed
    progress: bool = True
    output_dir: str = "runs"
    threads: PositiveInt | None = None

    _unique_names = field_validator("students")(unique_student_names)

    @field_validator("student")
    @classmethod
    def _student_source(cls, student: TextStudentConfig, info: ValidationInfo) -> TextStudentConfig:
        teacher = info.data.get("teacher")
        local = teacher is not None and teacher.local is not None
        if student.keep_layers is not None and not local and teacher is not None:
            raise ValueError(
                f"keep_layers derives the student from a local teacher's layers, but the teacher is "
                f"{teacher.form}: give student.path or student.config instead"
            )
        if student.config is not None and student.tokenizer is None and not local and teacher is not None:
            raise ValueError(
                'a student built from config needs student.tokenizer ("arithmetic" or a tokenizer '
                "folder) when the teacher is not local"
            )
        return student


__all__ = [
    "APITeacherConfig",
    "LocalTextTeacherConfig",
    "TextDataConfig",
    "TextEvalConfig",
    "TextRunConfig",
    "TextStudentConfig",
    "TextStudentRun",
    "TextTeacherConfig",
    "VLLMTeacherConfig",
]
