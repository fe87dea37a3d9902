"""Multi-digit addition with worked steps: a procedurally generated LM task with checkable answers.

A problem is a prompt ``"12+79="`` and a completion that works column by column from the least
significant digit, each step restating the two digits and the incoming carry, then the answer::

    12+79=2+9+0=11|1+7+1=09|=91<eos>

Every step has the same width ("a+b+c=ss|", 9 characters), so a tiny transformer learns where the
next digits are from relative positions; the sum is always written with two digits so the carry is
the first of them. Only the final answer after the last "=" is checked. The task, its character
tokenizer and a small teacher trained from scratch (cached as a plain Hugging Face folder) are
reused by the language-model methods to measure exposure bias: accuracy is reported by length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.paths import cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the text format changes: it is part of the teacher cache key
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
CHARACTERS = "0123456789+=|"


# --------------------------------------------------------------------------- tokenizer


def arithmetic_tokenizer() -> Any:
    """A character-level `PreTrainedTokenizerFast` (built offline) over digits, "+=|" and specials.

    Ids: <pad>=0, <bos>=1, <eos>=2, then one id per character. Encoding adds <bos> in front (the
    prompt's first token); decoding joins characters without spaces, so decode(encode(s)) == s.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2} | {ch: i + 3 for i, ch in enumerate(CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters, not words: no spaces between tokens
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="right"
    )


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One addition problem; `digits` is the operands' length (both operands have it)."""

    a: int
    b: int
    digits: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def completion(self) -> str:
        """Worked steps and the answer, without the EOS token (the collator appends it)."""
        da, db = str(self.a)[::-1], str(self.b)[::-1]
        carry, steps = 0, []
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            total = x + y + carry
            steps.append(f"{x}+{y}+{carry}={total:02d}|")
            carry = total // 10
        return "".join(steps) + f"={self.a + self.b}"

    @property
    def answer(self) -> int:
        return self.a + self.b


def _operand(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def make_problems(n: int, digits: tuple[int, int] = (1, 5), seed: int = 0) -> list[Problem]:
    """`n` problems whose operand length is drawn uniformly from [digits[0], digits[1]] (inclusive)."""
    if not 1 <= digits[0] <= digits[1]:
        raise ValueError(f"digits must satisfy 1 <= min <= max, got {digits}")
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        d = rng.randint(digits[0], digits[1])
        problems.append(Problem(_operand(rng, d), _operand(rng, d), d))
    return problems


def parse_answer(completion: str) -> int | None:
    """The integer after the last "=" of a generated completion (EOS/pad stripped), or None."""
    text = completion.replace(EOS, "").replace(PAD, "").strip()
    tail = text.rsplit("=", 1)[-1] if "=" in text else ""
    return int(tail) if tail.isdigit() else None


def check_answer(problem: Problem, completion: str) -> bool:
    """Exact match of the final answer (the worked steps are not graded)."""
    return parse_answer(completion) == problem.answer


def problem_sample(problem: Problem) -> dict[str, Any]:
    """The dict sample the prompt/completion collator reads."""
    return {"prompt": problem.prompt, "completion": problem.completion, "digits": problem.digits}


def arithmetic_dataset(n: int, digits: tuple[int, int] = (1, 5), seed: int = 0) -> list[dict[str, Any]]:
    """A finite list of `{"prompt", "completion", "digits"}` samples (see `make_problems`)."""
    return [problem_sample(p) for p in make_problems(n, digits, seed)]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def exact_match_by_length(
    model: nn.Module,
    tokenizer: Any,
    problems: Sequence[Problem],
    batch_size: int = 64,
    max_new_tokens: int | None = None,
) -> dict[int, float]:
    """Greedy-decoding exact-match accuracy per operand length: {digits: fraction correct in [0, 1]}.

    `max_new_tokens` defaults to what the longest problem's completion needs (+2 for EOS and slack).
    """
    from kdkit.samplers.collate import left_pad

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    need = max(len(p.completion) for p in problems) + 2
    correct: dict[int, int] = {}
    total: dict[int, int] = {}
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            prompt_ids, prompt_mask = left_pad(
                [tokenizer(p.prompt)["input_ids"] for p in chunk], tokenizer.pad_token_id
            )
            out = model.generate(
                input_ids=prompt_ids.to(device),
                attention_mask=prompt_mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens or need,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
            texts = tokenizer.batch_decode(out[:, prompt_ids.shape[1] :], skip_special_tokens=False)
            for problem, text in zip(chunk, texts):
                text = text.split(EOS)[0]
                total[problem.digits] = total.get(problem.digits, 0) + 1
                correct[problem.digits] = correct.get(problem.digits, 0) + int(check_answer(problem, text))
    finally:
        model.train(was_training)
    return {d: correct[d] / total[d] for d in sorted(total)}


# --------------------------------------------------------------------------- teacher


@dataclass
class ArithmeticTeacherConfig:
    """Everything that determines the cached teacher; its hash names the cache folder.

    The defaults (3 layers, width 64, ~0.15M parameters, 1000 steps of 32 problems with 1–4 digit
    operands) reach ~97% exact match on 3–4 digits in ~3 single-thread CPU minutes.
    """

    digits: tuple[int, int] = (1, 4)
    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 192
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    seed: int = 0
    format_version: int = field(default=FORMAT_VERSION)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def build_arithmetic_lm(
    tokenizer: Any,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised tiny Llama over the arithmetic vocabulary (max 256 positions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def get_arithmetic_teacher(
    config: ArithmeticTeacherConfig | None = None, *, retrain: bool = False, device: str | None = None
) -> tuple[nn.Module, Any, Path]:
    """The arithmetic teacher, trained from scratch on first use and cached as a plain HF folder.

    Returns (model in eval mode, tokenizer, folder). The folder is
    `cache_dir("teachers", "arithmetic-<hash of config>")` and holds the model, the tokenizer and
    `kdkit_teacher.json` (config, training seconds, exact match by length on 512 held-out problems,
    including one length past the training range). The training run folder is `<folder>/run`.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    config = config or ArithmeticTeacherConfig()
    folder = cache_dir("teachers", f"arithmetic-{config.key()}")
    if (folder / "kdkit_teacher.json").exists() and not retrain:
        model = AutoModelForCausalLM.from_pretrained(folder)
        return model.eval(), PreTrainedTokenizerFast.from_pretrained(folder), folder

    tokenizer = arithmetic_tokenizer()
    model = build_arithmetic_lm(
        tokenizer,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        seed=config.seed,
    )
    # Fresh problems for every step (no epoch repeats): steps × batch_size samples.
    samples = arithmetic_dataset(config.steps * config.batch_size, config.digits, seed=config.seed)
    started = time.perf_counter()
    train_causal_lm(model, tokenizer, samples, config, folder / "run")
    seconds = time.perf_counter() - started
    model = model.to(device or "cpu").eval()
    held_out = make_problems(512, (config.digits[0], config.digits[1] + 1), seed=10_000 + config.seed)
    accuracy = exact_match_by_length(model, tokenizer, held_out, batch_size=128)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"config": asdict(config), "train_seconds": seconds, "exact_match_by_length": accuracy}
    (folder / "kdkit_teacher.json").write_text(json.dumps(info, indent=2))
    log.info("arithmetic teacher trained in %.0f s: exact match %s", seconds, accuracy)
    return model, tokenizer, folder


def train_causal_lm(
    model: nn.Module,
    tokenizer: Any,
    samples: Sequence[dict[str, Any]],
    config: ArithmeticTeacherConfig,
    run_dir: Path,
    *,
    progress: bool = True,
    collate_fn: Any | None = None,
) -> None:
    """Cross-entropy on completion tokens with kdkit's engine (AdamW, cosine schedule, warmup).

    An interrupted run resumes from its last checkpoint in `run_dir`. `collate_fn` defaults to
    `PromptCompletionCollator(tokenizer)` (completion + EOS trained on).
    """
    from kdkit.config import TrainConfig
    from kdkit.engine import train
    from kdkit.methods.lm import LMDistiller
    from kdkit.samplers import DatasetSampler
    from kdkit.samplers.collate import PromptCompletionCollator

    # A teacher-less LMDistiller with ce_weight=1 is plain supervised fine-tuning.
    trainer = LMDistiller(model, None, sampler=DatasetSampler(), kd_weight=0.0, ce_weight=1.0)
    cfg = TrainConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        weight_decay=0.01,
        seed=config.seed,
        checkpoint_every=max(config.steps // 4, 1),
        log_every=50,
        mixed_precision="no",
        progress=progress,
    )
    collate_fn = collate_fn or PromptCompletionCollator(tokenizer)
    train(trainer, list(samples), cfg, run_dir, collate_fn=collate_fn, resume=True)
