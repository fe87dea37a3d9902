"""The one LM distiller: sampler → teacher signal → objective (+ optional CE), for every LM method.

`forward(batch)`:
1. the sampler decides which sequences are trained on (dataset / teacher / student / mixture …);
   it runs here on the unwrapped student, so the engine loop never changes;
2. the teacher signal gives the target under no_grad (full logits, hidden states for the fused
   loss, token log-probs, a cached sparse distribution …);
3. the objective returns its raw term "kd" (a mean over the tokens trained on);
4. a cross-entropy term on *dataset* completions only, from the same student forward pass.

It returns the weighted terms ("kd", "ce") plus detached diagnostics starting with "_" (the
engine logs them as diag/… and leaves them out of the loss): the unweighted "_kd_raw"/"_ce_raw"
so the two magnitudes can be compared, "_tokens" (the tokens the terms are means over, which the
engine uses to weigh micro-batches by tokens), whether the batch was on-policy, generation time.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.engine.distiller import Distiller
from kdkit.engine.phases import phase
from kdkit.losses.tokens import count_tokens
from kdkit.objectives.lm import DivergenceObjective, LMObjective, StudentView, student_cross_entropy
from kdkit.samplers import DatasetSampler
from kdkit.signals import LogitsSignal, TeacherSignal, TeacherTarget

log = logging.getLogger(__name__)

#: A warning is logged once when one weighted term is this many times smaller than the other.
MAGNITUDE_WARNING_RATIO = 1000.0


def output_vocab_size(model: nn.Module) -> int:
    """Number of logits a causal LM produces per position."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_teacher_student(student: nn.Module, teacher: nn.Module, tokenizers: tuple[Any, Any] | None) -> None:
    """Refuse a teacher/student pair whose vocabularies cannot be compared id by id.

    Output sizes that differ are fine only for one tokenizer padded to different sizes; without
    the tokenizers that cannot be told apart from a real mismatch, so it is refused.
    """
    v_s, v_t = output_vocab_size(student), output_vocab_size(teacher)
    if tokenizers is not None:
        from kdkit.models.tokenizers import check_vocabularies

        check_vocabularies(tokenizers[0], tokenizers[1], v_t, v_s)
    elif v_s != v_t:
        raise ValueError(
            f"the teacher outputs {v_t:,} logits per token and the student {v_s:,}: pass "
            "tokenizers=(teacher_tokenizer, student_tokenizer) so kdkit can check they are one tokenizer "
            "padded to different sizes (then the shared ids are compared), or choose models with one "
            "vocabulary"
        )


class LMDistiller(Distiller):
    """A causal-LM student distilled from a frozen causal-LM teacher (see the module docstring).

    sampler: a batch transform (default: the dataset's completions).
    signal: a teacher signal (default: full logits); None when kd_weight is 0.
    objective: an LM objective (default: forward KL on full logits).
    kd_weight, ce_weight: weights of the "kd" and "ce" terms; a weight of 0 drops the term.
    tokenizers: (teacher's, student's), to check the vocabularies where output sizes differ.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        sampler: Any | None = None,
        signal: TeacherSignal | None = None,
        objective: LMObjective | None = None,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        tokenizers: tuple[Any, Any] | None = None,
    ) -> None:
        super().__init__(student, teacher)
        if kd_weight == 0 and ce_weight == 0:
            raise ValueError("both kd_weight and ce_weight are 0: nothing to train")
        self.objective = objective or DivergenceObjective()
        if kd_weight > 0:
            signal = signal or LogitsSignal()
            if getattr(signal, "needs_teacher_model", True) and teacher is None:
                raise ValueError("kd_weight > 0 needs a teacher (set kd_weight=0 for plain fine-tuning)")
            if signal.provides not in self.objective.accepts and self.objective.accepts:
                raise ValueError(
                    f"objective {type(self.objective).__name__} accepts {self.objective.accepts}, "
                    f"but the teacher signal {type(signal).__name__} provides {signal.provides!r}"
                )
        if teacher is not None:
            check_teacher_student(student, teacher, tokenizers)
        self.sampler = sampler or DatasetSampler()
        self.signal = signal
        self.kd_weight, self.ce_weight = kd_weight, ce_weight
        self._warned_magnitude = False
        self._magnitude_calls = 0

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        with phase("sample"):  # a dataset batch passes through; on-policy ones are generated here
            batch = self.sampler(batch, student=self.student, teacher=self.teacher)
        source = batch.get("source", "dataset")
        labels = batch["labels"]
        view = StudentView(self.student, batch)
        want_ce = self.ce_weight > 0 and source == "dataset"  # CE only on ground-truth tokens
        raw: dict[str, Tensor] = {}
        if self.kd_weight > 0:
            assert self.signal is not None
            with torch.no_grad(), phase("teacher"):
                target = self.signal(batch, teacher=self.teacher)
            ce_ratio = self.ce_weight / self.kd_weight if want_ce else 0.0
            with phase("loss"):  # the student's forward pass runs inside, when the objective asks for it
                raw |= self.objective(view, batch, target, ce_ratio=ce_ratio)
        if want_ce and "ce" not in raw:
            with phase("loss"):
                raw["ce"] = student_cross_entropy(view, labels)

        terms = {}
        if "kd" in raw:
            terms["kd"] = self.kd_weight * raw["kd"]
        if "ce" in raw:
            terms["ce"] = self.ce_weight * raw["ce"]
        if not terms:  # a generated batch under a CE-only setup: nothing to learn from it
            terms["ce"] = labels.new_zeros((), dtype=torch.float32).requires_grad_()
        self._check_magnitudes(terms)
        return terms | self._diagnostics(raw, batch, labels, source)

    def _diagnostics(
        self, raw: dict[str, Tensor], batch: dict[str, Any], labels: Tensor, source: str
    ) -> dict[str, Tensor]:
        def value(x: float | Tensor) -> Tensor:
            # a number known on the host stays there: moving it to a GPU would wait for the GPU
            if not isinstance(x, Tensor):
                return torch.tensor(float(x), dtype=torch.float32)
            return x.detach().to(torch.float32).reshape(())

        info = batch.get("sampler_info", {})
        out = {f"_{name}_raw": value(v) for name, v in raw.items() if name in ("kd", "ce")}
        out |= {f"_{name}": value(v) for name, v in raw.items() if name not in ("kd", "ce")}
        out["_tokens"] = value(count_tokens(labels).float())
        out["_on_policy"] = value(1.0 if source == "student" else 0.0)
        out["_gen_s"] = value(info.get("generation_s", 0.0))
        if "truncated" in info:
            out["_truncated"] = value(info["truncated"])
        return out

    def _check_magnitudes(self, terms: dict[str, Tensor]) -> None:
        # reading the terms waits for the GPU: look at the first call and then every 100th only
        self._magnitude_calls += 1
        if self._warned_magnitude or len(terms) < 2 or (self._magnitude_calls - 1) % 100:
            return
        kd, ce = float(terms["kd"].detach().abs()), float(terms["ce"].detach().abs())
        small, large = sorted((kd, ce))
        if small > 0 and large / small > MAGNITUDE_WARNING_RATIO:
            log.warning(
                "the weighted kd term (%.3g) and ce term (%.3g) differ by more than %.0f×; "
                "the smaller one barely moves the student, check kd_weight / ce_weight",
                kd,
                ce,
                MAGNITUDE_WARNING_RATIO,
            )
            self._warned_magnitude = True


__all__ = [
    "LMDistiller",
    "MAGNITUDE_WARNING_RATIO",
    "TeacherTarget",
    "check_teacher_student",
    "output_vocab_size",
]
