"""Teacher/student tokenizer checks and logit alignment for same-tokenizer distillation.

Token-level divergences compare p_T(v) and p_S(v) for the same id v, which is only meaningful when
both models share one tokenizer. Models of one family often pad their embedding matrices to
different sizes (e.g. 151,936 vs 152,064) with ids no tokenizer ever produces; those are aligned by
cutting both logit tensors to the shared ids. Anything else is refused with a message a person
can act on, instead of mis-aligning silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Text tokenised by both tokenizers as a last check: equal vocabularies with different merges or
# normalisers would still split text differently.
_PROBE_TEXT = "Hello, world! def f(x):\n    return x ** 2  # naïve café 123456 <tag>"


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers differ; token-level distillation would compare unrelated ids."""


@dataclass(frozen=True)
class VocabAlignment:
    """How teacher and student logits line up.

    shared_size: compare logits on ids [0, shared_size) only (min of the two embedding sizes).
    tokenizer_size: ids the tokenizer can produce (len(tokenizer)); ids past it are padding rows.
    """

    shared_size: int
    teacher_vocab_size: int
    student_vocab_size: int
    tokenizer_size: int

    @property
    def needs_slicing(self) -> bool:
        return self.teacher_vocab_size != self.student_vocab_size


def tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's name_or_path, or its class name when it has none."""
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _id_to_token(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    return {index: token for token, index in tokenizer.get_vocab().items()}


def _first_difference(teacher: dict[int, str], student: dict[int, str]) -> tuple[int, str | None, str | None]:
    for index in sorted(set(teacher) | set(student)):
        if teacher.get(index) != student.get(index):
            return index, teacher.get(index), student.get(index)
    raise AssertionError("vocabularies are equal")  # pragma: no cover - callers check first


def _show(token: str | None) -> str:
    return "(no token)" if token is None else repr(token)


def _refuse(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase, detail: str) -> None:
    raise TokenizerMismatchError(
        f"teacher and student tokenizers differ ({tokenizer_name(teacher)} vs {tokenizer_name(student)}; "
        f"{detail}); choose a cross-tokenizer method or matching models"
    )


def check_vocabularies(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_vocab_size: int,
    student_vocab_size: int,
) -> VocabAlignment:
    """Check that teacher and student share a tokenizer; say which logit ids to compare.

    teacher_vocab_size, student_vocab_size: the models' output sizes (config.vocab_size / logits.shape[-1]),
    which may exceed len(tokenizer) by padding. Identical tokenizers with equal sizes pass silently;
    different padded sizes pass with one INFO log line. Raises TokenizerMismatchError (a ValueError)
    naming both tokenizers and the first differing id when the vocabularies or their tokenisation
    differ, or ValueError when a model's output is smaller than the tokenizer.
    """
    teacher_vocab = _id_to_token(teacher_tokenizer)
    student_vocab = _id_to_token(student_tokenizer)
    if teacher_vocab != student_vocab:
        index, t_token, s_token = _first_difference(teacher_vocab, student_vocab)
        _refuse(
            teacher_tokenizer,
            student_tokenizer,
            f"first difference at id {index}: {_show(t_token)} vs {_show(s_token)}",
        )
    t_ids = teacher_tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    s_ids = student_tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if t_ids != s_ids:
        position = next(
            (i for i, (a, b) in enumerate(zip(t_ids, s_ids)) if a != b), min(len(t_ids), len(s_ids))
        )
        _refuse(
            teacher_tokenizer,
            student_tokenizer,
            f"same vocabulary but different splits of {_PROBE_TEXT[:20]!r}...: token {position} is "
            f"{teacher_tokenizer.convert_ids_to_tokens(t_ids[position : position + 1])} vs "
            f"{student_tokenizer.convert_ids_to_tokens(s_ids[position : position + 1])}",
        )
    # len() counts added tokens too; max id + 1 guards against vocabularies with holes.
    tokenizer_size = max(len(teacher_tokenizer), max(teacher_vocab, default=-1) + 1)
    for role, size in (("teacher", teacher_vocab_size), ("student", student_vocab_size)):
        if size < tokenizer_size:
            raise ValueError(
                f"the {role} model outputs {size:,} logits but its tokenizer "
                f"{tokenizer_name(teacher_tokenizer)} has {tokenizer_size:,} ids; resize its embeddings"
            )
    shared = min(teacher_vocab_size, student_vocab_size)
    if teacher_vocab_size != student_vocab_size:
        logger.info(
            "teacher and student share a tokenizer; aligning logits on the first %s ids "
            "(teacher vocabulary %s, student %s)",
            f"{shared:,}",
            f"{teacher_vocab_size:,}",
            f"{student_vocab_size:,}",
        )
    return VocabAlignment(shared, teacher_vocab_size, student_vocab_size, tokenizer_size)


def align_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alignment: VocabAlignment,
    *,
    mask_padding: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut student and teacher logits to the shared ids.

    student_logits: [..., V_S], teacher_logits: [..., V_T]  ->  both [..., alignment.shared_size].
    mask_padding: also set ids >= tokenizer_size (embedding padding no text produces) to -inf in
        both, so neither distribution spends mass there. Off by default: the divergence must then
        handle -inf logits (0 * log 0 terms).
    Returns views when no masking is needed (no copy).
    """
    for role, logits, size in (
        ("student", student_logits, alignment.student_vocab_size),
        ("teacher", teacher_logits, alignment.teacher_vocab_size),
    ):
        if logits.shape[-1] != size:
            raise ValueError(f"{role} logits have {logits.shape[-1]} ids, the alignment expects {size}")
    student_logits = student_logits[..., : alignment.shared_size]
    teacher_logits = teacher_logits[..., : alignment.shared_size]
    if mask_padding and alignment.tokenizer_size < alignment.shared_size:
        student_logits = student_logits.clone()
        teacher_logits = teacher_logits.clone()
        student_logits[..., alignment.tokenizer_size :] = float("-inf")
        teacher_logits[..., alignment.tokenizer_size :] = float("-inf")
    return student_logits, teacher_logits
