"""A tiny causal-LM distillation for the token-normalisation tests: completions of very different
lengths, so a token in a short completion and one in a long completion weigh alike only if the
engine normalises by the tokens of the whole optimizer step.

Imported by the unit tests, and run as a script by the multi-process test:

    accelerate launch --multi_gpu --num_processes 2 tests/engine/tiny_lm.py RUN_DIR --batch-size 16

The script writes RUN_DIR/final.safetensors (student weights) and prints the TrainResult as one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from kdkit.engine import Distiller, TrainConfig, train

VOCAB, WIDTH, LENGTH = 13, 8, 24
IGNORE = -100


class CompletionDataset(Dataset):
    """`size` sequences [LENGTH]: a 2-4 token prompt (no loss), then a completion of 1-2 tokens for
    the even indices and 16-20 tokens for the odd ones, then padding (id 0, no loss).

    Items: input_ids [LENGTH] int64, attention_mask [LENGTH] int64, labels [LENGTH] int64
    (IGNORE on prompt and padding)."""

    def __init__(self, size: int = 64) -> None:
        generator = torch.Generator().manual_seed(4321)
        self.items = []
        for index in range(size):
            prompt = int(torch.randint(2, 5, (), generator=generator))
            low, high = (1, 3) if index % 2 == 0 else (16, 21)
            completion = int(torch.randint(low, high, (), generator=generator))
            used = prompt + completion
            ids = torch.zeros(LENGTH, dtype=torch.long)
            ids[:used] = torch.randint(1, VOCAB, (used,), generator=generator)
            labels = torch.full((LENGTH,), IGNORE)
            labels[prompt:used] = ids[prompt:used]
            mask = (torch.arange(LENGTH) < used).long()
            self.items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class TinyCausalLM(nn.Module):
    """logits[t] from token t and the running mean of tokens ≤ t: causal, like an LM. [B,T] -> [B,T,V]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(2 * WIDTH, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # [B, T, W]
        steps = torch.arange(1, input_ids.shape[1] + 1, device=x.device).view(1, -1, 1)
        context = x.cumsum(1) / steps
        return self.head(torch.cat([x, context], -1))


def make_models() -> tuple[nn.Module, nn.Module]:
    """(student, teacher) with fixed initial weights, independent of the global RNG's state."""
    state = torch.get_rng_state()
    torch.manual_seed(11)
    student, teacher = TinyCausalLM(), TinyCausalLM()
    torch.set_rng_state(state)
    return student, teacher


def token_terms(
    student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """0.5·forward KL(p_T ‖ p_S) + 0.5·CE, each a mean over the completion tokens; `_tokens` their count."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    count = mask.sum()
    logits = student(batch["input_ids"])[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(batch["input_ids"])[:, :-1]
    log_s, log_t = logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, T-1]
    ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # [B, T-1]
    denominator = count.clamp(min=1)
    return {
        "kd": 0.5 * (kl * mask).sum() / denominator,
        "ce": 0.5 * (ce * mask).sum() / denominator,
        "_tokens": count.detach().float(),
    }


class TokenKD(Distiller):
    """Token-level KD on completions; reports `_tokens` unless `report_tokens` is False (then the
    engine weighs micro-batches alike, the behaviour for distillers without a token count).
    Raises after `fail_after` calls to simulate a crash."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, report_tokens: bool = True,
                 fail_after: int | None = None) -> None:
        super().__init__(student, teacher)
        self.report_tokens = report_tokens
        self.fail_after = fail_after
        self.calls = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        terms = token_terms(self.student, self.teacher, batch)
        if not self.report_tokens:
            del terms["_tokens"]
        return terms


def lm_config(**overrides: object) -> TrainConfig:
    """Plain SGD without clipping, so the update is the gradient itself (Adam's first step and
    clipping would hide a wrongly scaled gradient)."""
    settings: dict[str, object] = dict(
        steps=2, batch_size=32, optimizer="sgd", momentum=0.0, lr=0.5, schedule="constant",
        warmup_steps=0, max_grad_norm=None, checkpoint_every=100, log_every=1, progress=False,
        mixed_precision="no", seed=5,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grad-accum", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    distiller = TokenKD(*make_models())
    cfg = lm_config(steps=args.steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum)
    result = train(distiller, CompletionDataset(), cfg, args.run_dir)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        weights = {k: v.detach().cpu().contiguous() for k, v in distiller.student.state_dict().items()}
        save_file(weights, str(args.run_dir / "final.safetensors"))
        print(json.dumps({"steps": result.steps, "final_losses": result.final_losses}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
