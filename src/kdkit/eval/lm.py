"""Language-model evaluation: perplexity, teacher agreement, likelihood of samples, throughput.

Batches are the LM batch dicts of `kdkit.samplers.collate` (input_ids / attention_mask / labels,
labels -100 where not scored); every average is token-weighted over the label tokens, so long and
short sequences weigh each token alike. Log-likelihoods are in nats per token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kdkit.losses.tokens import shared_vocab, shift, token_log_probs
from kdkit.samplers.generation import GenerationSettings, generate_batch


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    device = _device(model)
    return model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits


class _EvalMode:
    """Context: eval mode and no grad for the given models, their training flags restored after."""

    def __init__(self, *models: nn.Module | None) -> None:
        self.models = [m for m in models if m is not None]

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.models]
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        for m in self.models:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        torch.set_grad_enabled(self.grad)
        for m, flag in zip(self.models, self.flags):
            m.train(flag)


def perplexity(model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Held-out perplexity over label tokens: {"nll": nats/token, "perplexity": exp(nll), "tokens"}."""
    total, count = 0.0, 0
    with _EvalMode(model):
        for batch in batches:
            logits, targets, mask = shift(_logits(model, batch), batch["labels"].to(_device(model)))
            log_p = token_log_probs(logits, targets)
            total += float(-(log_p * mask).sum())
            count += int(mask.sum())
    nll = total / max(count, 1)
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": float(count)}


def token_agreement(
    student: nn.Module, teacher: nn.Module, batches: Iterable[dict[str, Any]]
) -> dict[str, float]:
    """Top-1 agreement with the teacher on label positions (same text fed to both).

    Returns {"agreement": fraction of label tokens where argmax p_S == argmax p_T (shared ids),
    "student_accuracy": fraction where the student's argmax is the label token, "tokens"}.
    """
    agree = correct = count = 0
    with _EvalMode(student, teacher):
        for batch in batches:
            labels = batch["labels"].to(_device(student))
            s_logits, t_logits = shared_vocab(
                _logits(student, batch), _logits(teacher, batch).to(labels.device)
            )
            s_logits, targets, mask = shift(s_logits, labels)
            s_top, t_top = s_logits.argmax(-1), t_logits[:, :-1].argmax(-1)
            agree += int(((s_top == t_top) & mask).sum())
            correct += int(((s_top == targets) & mask).sum())
            count += int(mask.sum())
    denominator = max(count, 1)
    return {
        "agreement": agree / denominator,
        "student_accuracy": correct / denominator,
        "tokens": float(count),
    }


def sample_log_likelihoods(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[dict[str, Any]],
    settings: GenerationSettings | None = None,
) -> dict[str, float]:
    """Sample the student's completions of each batch's prompts and score them with both models.

    Returns, per generated token (EOS included): "teacher_logp" = mean log p_T(y_t), "student_logp"
    = mean log p_S(y_t), "rkl_estimate" = student_logp − teacher_logp (a Monte-Carlo estimate of
    the per-token KL(p_S ‖ p_T) on the student's own samples; ≥ 0 in expectation), "tokens",
    "truncated" (samples that hit max_new_tokens without EOS) and "generation_s".
    """
    settings = settings or GenerationSettings()
    s_total = t_total = 0.0
    count = truncated = 0
    seconds = 0.0
    with _EvalMode(student, teacher):
        for batch in batches:
            device = _device(student)
            generated, info = generate_batch(
                student, batch["prompt_ids"].to(device), batch["prompt_attention_mask"].to(device), settings
            )
            labels = generated["labels"]
            s_logits, t_logits = shared_vocab(
                _logits(student, generated), _logits(teacher, generated).to(device)
            )
            s_logits, targets, mask = shift(s_logits, labels)
            s_total += float((token_log_probs(s_logits, targets) * mask).sum())
            t_total += float((token_log_probs(t_logits[:, :-1], targets) * mask).sum())
            count += int(mask.sum())
            truncated += int(info["truncated"])
            seconds += info["generation_s"]
    n = max(count, 1)
    return {
        "teacher_logp": t_total / n,
        "student_logp": s_total / n,
        "rkl_estimate": (s_total - t_total) / n,
        "tokens": float(count),
        "truncated": float(truncated),
        "generation_s": seconds,
    }


def generation_throughput(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    *,
    max_new_tokens: int = 32,
    repeats: int = 1,
) -> dict[str, float]:
    """Greedy batched generation speed with the KV cache: {"tokens_per_s", "seconds", "new_tokens"}.

    prompt_ids / prompt_attention_mask: [B, P] left-padded. EOS is disabled so every row
    generates exactly `max_new_tokens` (tokens_per_s = B·max_new_tokens·repeats / wall seconds).
    """
    device = _device(model)
    ids, mask = prompt_ids.to(device), prompt_attention_mask.to(device)
    pad = getattr(model.config, "pad_token_id", None)
    pad = 0 if pad is None else pad
    with _EvalMode(model):
        started = time.perf_counter()
        for _ in range(repeats):
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=pad,
                use_cache=True,
            )
        seconds = time.perf_counter() - started
    new_tokens = ids.shape[0] * max_new_tokens * repeats
    return {
        "tokens_per_s": new_tokens / max(seconds, 1e-9),
        "seconds": seconds,
        "new_tokens": float(new_tokens),
    }
