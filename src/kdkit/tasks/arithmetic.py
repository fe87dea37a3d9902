"""Multi-digit addition with worked steps: a procedurally generated LM task with checkable answers.

A problem is a prompt ``"12+79="`` and a completion that works column by column from the least
significant digit, each step restating the two digits and the incoming carry, then the answer::

    12+79=2+9+0=11|1+7+1=09|=91<eos>

Every step has the same width ("a+b+c=ss|", 9 characters), so a tiny transformer learns where the
next digits are from relative positions; the sum is always written with two digits so the carry is
the first of them. Only the final answer after the last "=" is checked. The task, its character
tokenizer and a tiny Llama builder are reused by the language-model methods to measure exposure
bias: accuracy is reported by length. The teacher is trained and cached by
`kdkit.pipelines.teachers.get_arithmetic_teacher` (tasks define problems; pipelines train models).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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
