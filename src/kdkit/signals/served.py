"""A served teacher's top-k log-probs as the sparse teacher signal, live (also on-policy).

Every batch's completions (the dataset's, the teacher's or the student's own samples) are scored by
an OpenAI-compatible server through ``echo`` + ``logprobs`` (what vLLM offers); the top-k log-probs
at each completion position become a `SparseTarget` over the shifted positions [B, T-1, K], the
same format as the logit cache's. No teacher model is loaded: the teacher is the server.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from kdkit.registry import TEACHER_SIGNALS
from kdkit.settings import LMContext, ParamsModel
from kdkit.signals.base import SparseTarget, TeacherSignal, TeacherTarget


class ServedParams(ParamsModel):
    """base_url / served_model: the endpoint ("http://host:8000/v1") and its model name;
    api_key_env: the environment variable holding the key (its name only; None = no key);
    top_k: log-probs kept per position; the client's concurrency, timeout, retries and
    requests-per-minute limit; extra_body: fields merged into every request (e.g. vLLM's
    {"return_tokens_as_token_ids": true}, which maps tokens to ids exactly)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    served_model: str = "teacher"
    api_key_env: str | None = None
    top_k: PositiveInt = 20
    max_concurrency: PositiveInt = 8
    timeout_s: PositiveFloat = 60.0
    max_retries: int = Field(6, ge=0)
    requests_per_minute: PositiveFloat | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)


@TEACHER_SIGNALS.register(
    "served", "top-k log-probs of a served teacher (OpenAI-compatible echo), as a sparse target"
)
class ServedSignal(TeacherSignal):
    """The sparse target of `kdkit.teachers.sparse.served_sparse_target` from an `OpenAITeacher`."""

    Params = ServedParams
    provides = "sparse"
    needs_teacher_model = False

    def __init__(self, params: Any | None = None, ctx: LMContext | None = None, teacher: Any = None) -> None:
        super().__init__(params, ctx)
        if self.ctx.tokenizer is None:
            raise ValueError("the served signal needs the student's tokenizer (LMContext.tokenizer)")
        if teacher is None:
            from kdkit.teachers.http import OpenAITeacher

            p = self.params
            teacher = OpenAITeacher(
                p.base_url,
                p.served_model,
                api_key_env=p.api_key_env,
                max_concurrency=p.max_concurrency,
                timeout_s=p.timeout_s,
                max_retries=p.max_retries,
                requests_per_minute=p.requests_per_minute,
                extra_body=p.extra_body,
            )
        self.text_teacher = teacher  # any TextTeacher that can score (tests pass HFTeacher)

    def __call__(self, batch: dict[str, Any], *, teacher: nn.Module | None) -> TeacherTarget:
        from kdkit.teachers.sparse import served_sparse_target

        target = served_sparse_target(self.text_teacher, self.ctx.tokenizer, batch, self.params.top_k)
        return TeacherTarget(
            sparse=SparseTarget(
                ids=target["ids"], logprobs=target["logprobs"], tail_logprob=target["tail_logprob"]
            )
        )
