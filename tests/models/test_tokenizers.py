"""Teacher/student tokenizer checks: identical pass, padded vocabularies align, real mismatches refused."""

from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from kdkit.models.tokenizers import (
    TokenizerMismatchError,
    VocabAlignment,
    align_logits,
    check_vocabularies,
)

SENTENCES = (
    "the cat sat on a mat and dog ran to park",
    "hello world python code is fun what",
    "1 2 3 4 5 6 7 8 9 0 + = ? ! . , :",
    "user assistant system say hi answer",
)
WORDS = tuple(dict.fromkeys(word for sentence in SENTENCES for word in sentence.split()))
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tiny_tokenizer(
    words: tuple[str, ...] | list[str] = WORDS,
    *,
    name: str = "tiny-words",
    chat_template: str | None = None,
    split_punctuation: bool = True,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline: ids 0-2 are <unk>, <eos>, <bos>; BOS is prepended."""
    vocab = {word: index for index, word in enumerate(["<unk>", "<eos>", "<bos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Whitespace() also splits punctuation off words; WhitespaceSplit() does not.
    splitter = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    backend.pre_tokenizer = splitter
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>"
    )
    tokenizer.name_or_path = name
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def test_identical_tokenizers_pass_silently(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kdkit")
    alignment = check_vocabularies(tiny_tokenizer(), tiny_tokenizer(name="copy"), 64, 64)
    assert alignment == VocabAlignment(64, 64, 64, len(WORDS) + 3)
    assert not alignment.needs_slicing
    assert caplog.records == []


def test_padded_vocabularies_align_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kdkit")
    alignment = check_vocabularies(tiny_tokenizer(), tiny_tokenizer(), 152_064, 151_936)
    assert alignment.shared_size == 151_936 and alignment.needs_slicing
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "teacher and student share a tokenizer; aligning logits on the first 151,936 ids "
        "(teacher vocabulary 152,064, student 151,936)"
    ]


def test_different_vocabularies_are_refused_with_both_names_and_first_difference() -> None:
    teacher = tiny_tokenizer(name="SmolLM2")
    student = tiny_tokenizer(("cat", "the", *WORDS[2:]), name="gpt2")  # ids 3 and 4 swapped
    with pytest.raises(TokenizerMismatchError) as caught:
        check_vocabularies(teacher, student, 64, 64)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "(SmolLM2 vs gpt2; first difference at id 3: 'the' vs 'cat')" in message
    assert message.endswith("choose a cross-tokenizer method or matching models")


def test_extra_tokens_in_one_tokenizer_are_a_mismatch() -> None:
    expected = rf"first difference at id {len(WORDS) + 3}: \(no token\) vs 'extra'"
    with pytest.raises(TokenizerMismatchError, match=expected):
        check_vocabularies(tiny_tokenizer(), tiny_tokenizer([*WORDS, "extra"], name="bigger"), 64, 64)


def test_same_vocabulary_but_different_splitting_is_refused() -> None:
    other = tiny_tokenizer(name="no-punct-split", split_punctuation=False)
    with pytest.raises(TokenizerMismatchError, match="same vocabulary but different splits"):
        check_vocabularies(tiny_tokenizer(), other, 64, 64)


def test_model_smaller_than_tokenizer_is_an_error() -> None:
    with pytest.raises(ValueError, match="student model outputs 10 logits"):
        check_vocabularies(tiny_tokenizer(), tiny_tokenizer(), 64, 10)


def test_align_logits_slices_to_the_shared_ids() -> None:
    alignment = VocabAlignment(shared_size=6, teacher_vocab_size=8, student_vocab_size=6, tokenizer_size=4)
    student = torch.randn(2, 3, 6)
    teacher = torch.randn(2, 3, 8)
    s, t = align_logits(student, teacher, alignment)
    assert s.shape == t.shape == (2, 3, 6)
    assert torch.equal(t, teacher[..., :6]) and torch.equal(s, student)

    s, t = align_logits(student, teacher, alignment, mask_padding=True)
    assert torch.isneginf(s[..., 4:]).all() and torch.isneginf(t[..., 4:]).all()
    assert torch.equal(s[..., :4], student[..., :4]) and torch.equal(t[..., :4], teacher[..., :4])
    assert torch.isfinite(student).all()  # the caller's tensors are not modified

    with pytest.raises(ValueError, match="teacher logits have 6 ids"):
        align_logits(student, student, alignment)


def test_aligned_logits_of_padded_models_give_a_finite_divergence() -> None:
    from kdkit.models.lm import build_causal_lm

    tokenizer = tiny_tokenizer()
    common = dict(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    common |= dict(num_attention_heads=4, num_key_value_heads=2)
    teacher = build_causal_lm({**common, "vocab_size": 80}).eval()
    student = build_causal_lm({**common, "vocab_size": 64}).eval()
    alignment = check_vocabularies(tokenizer, tokenizer, teacher.config.vocab_size, student.config.vocab_size)
    ids = tokenizer(["the cat sat on a mat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        s, t = align_logits(student(ids).logits, teacher(ids).logits, alignment)
    kl = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
    assert s.shape[-1] == 64 and torch.isfinite(kl) and kl > 0
