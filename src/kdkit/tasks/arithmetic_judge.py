"""A judge for the arithmetic task, trained from scratch: does this worked solution reach the right sum?

The judge is a tiny causal LM over the arithmetic characters plus "?", "Y", "N". It reads
``"{prompt}{completion}?"`` (e.g. ``"12+79=2+9+0=11|1+7+1=09|=91?"``) and predicts "Y" when the final
answer is the true sum, else "N" — the label the task's checker gives. It is trained on worked
solutions labelled correct/incorrect: half are right, half are corrupted the ways a student errs
(a wrong column sum carried consistently to the answer, a dropped carry, a misread operand digit,
a wrong final answer under right steps, a solution cut short). This module makes the labelled
data; the judge is trained and cached (like the arithmetic teacher) by
`kdkit.pipelines.judges.get_arithmetic_judge`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdkit.paths import cache_dir
from kdkit.tasks.arithmetic import CHARACTERS, EOS, PAD, Problem, make_problems
from kdkit.tasks.text_tokenizer import char_tokenizer

JUDGE_FORMAT_VERSION = 2
JUDGE_TEMPLATE = "{prompt}{completion}?"
YES, NO = "Y", "N"
CORRUPTIONS = ("step_sum", "carry", "operand", "answer", "truncated")

_PROMPT = re.compile(r"^\s*(\d+)\+(\d+)=\s*$")


def judge_tokenizer() -> Any:
    """Character tokenizer over the arithmetic characters and "?YN"."""
    return char_tokenizer(CHARACTERS + "?" + YES + NO)


# --------------------------------------------------------------------------- checker on text


def parse_prompt(prompt: str) -> tuple[int, int] | None:
    """(a, b) from an arithmetic prompt "a+b=" (special tokens already stripped), or None."""
    match = _PROMPT.match(prompt.replace("<bos>", ""))
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_text(prompt: str, completion: str) -> float:
    """1.0 when the completion's final answer (after its last "=") is a + b of the prompt, else 0.0."""
    operands = parse_prompt(prompt)
    if operands is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    text = completion.replace(EOS, "").replace(PAD, "").strip()
    tail = text.rsplit("=", 1)[-1] if "=" in text else ""
    return float(tail.isdigit() and int(tail) == operands[0] + operands[1])


# --------------------------------------------------------------------------- labelled solutions


def _steps(
    digits_a: list[int],
    digits_b: list[int],
    *,
    bad_step: int | None = None,
    delta: int = 0,
    drop_carry: int | None = None,
) -> tuple[str, int]:
    """Worked steps (least significant first) with an optional error; returns (text, implied answer)."""
    carry, out, value = 0, [], 0
    for i, (x, y) in enumerate(zip(digits_a, digits_b)):
        c = 0 if i == drop_carry else carry
        total = x + y + c
        if i == bad_step:
            total = (total + delta) % 20  # a wrong column sum, still two digits
        out.append(f"{x}+{y}+{c}={total:02d}|")
        value += (total % 10) * 10**i
        carry = total // 10
    value += carry * 10 ** len(digits_a)
    return "".join(out), value


def corrupt(problem: Problem, kind: str, rng: random.Random) -> str:
    """A worked solution of `problem` with one error of `kind` (see CORRUPTIONS)."""
    da = [int(ch) for ch in str(problem.a)[::-1]]
    db = [int(ch) for ch in str(problem.b)[::-1]]
    width = max(len(da), len(db))
    da += [0] * (width - len(da))
    db += [0] * (width - len(db))
    if kind == "step_sum":  # one column added wrongly; the rest follows from it, answer consistent
        steps, value = _steps(da, db, bad_step=rng.randrange(width), delta=rng.choice([-2, -1, 1, 2]))
        return steps + f"={value}"
    if kind == "carry":  # a carry dropped where the column before summed to >= 9 (else: a wrong
        # column sum); where that column held exactly 9 with no carry-in nothing changes and the
        # sample stays right (the checker labels it "Y"), about 1 in 10 of these
        carries = [i for i in range(1, width) if (da[i - 1] + db[i - 1]) >= 9]
        if not carries:
            return corrupt(problem, "step_sum", rng)
        steps, value = _steps(da, db, drop_carry=rng.choice(carries))
        return steps + f"={value}"
    if kind == "operand":  # a digit of an operand misread in its column, computed on from there
        i = rng.randrange(width)
        da = list(da)
        da[i] = (da[i] + rng.choice([1, 2, 3, 7, 8, 9])) % 10
        steps, value = _steps(da, db)
        return steps + f"={value}"
    if kind == "answer":  # right steps, a wrong final answer
        right = str(problem.answer)
        pos = rng.randrange(len(right))
        wrong = right[:pos] + str((int(right[pos]) + rng.randint(1, 9)) % 10) + right[pos + 1 :]
        if rng.random() < 0.2:  # a dropped or extra digit
            wrong = wrong[:-1] if len(wrong) > 1 and rng.random() < 0.5 else wrong + str(rng.randint(0, 9))
        return problem.completion.rsplit("=", 1)[0] + "=" + (wrong.lstrip("0") or "0")
    if kind == "truncated":  # stopped early: no final answer
        text = problem.completion
        return text[: rng.randrange(1, len(text) - 1)]
    raise ValueError(f"unknown corruption {kind!r} (known: {', '.join(CORRUPTIONS)})")


def judge_samples(
    n: int, digits: tuple[int, int], seed: int, *, generative_aux: bool = False
) -> list[dict[str, Any]]:
    """n `{"prompt", "completion", "label"}` samples: prompt = the filled template, completion = "Y"/"N".

    Half right solutions, half corrupted (kinds uniformly); the label is the checker's verdict (a
    corruption that happens to land on the right sum is labelled "Y").
    generative_aux: right solutions are trained on in full (prompt = the problem, completion = the
    solution + "?" + "Y"), so the judge also learns to work sums out itself, which makes wrong digits
    stand out; the token sequence is the same, only which tokens carry a loss differs. Verifying
    from the verdict token alone barely moves the loss from ln 2 in 500 steps at this size.
    """
    rng = random.Random(seed)
    out = []
    for problem in make_problems(n, digits, seed=seed):
        if rng.random() < 0.5:
            completion = problem.completion
        else:
            completion = corrupt(problem, rng.choice(CORRUPTIONS), rng)
        label = check_text(problem.prompt, completion)
        text = JUDGE_TEMPLATE.format(prompt=problem.prompt, completion=completion)
        verdict = YES if label else NO
        sample = {"prompt": text, "completion": verdict, "label": int(label), "digits": problem.digits}
        if generative_aux and label:
            sample |= {"prompt": problem.prompt, "completion": text[len(problem.prompt) :] + YES}
        out.append(sample)
    return out


@dataclass
class ArithmeticJudgeConfig:
    """Everything that determines the cached judge; its hash names the cache folder (trained by
    `kdkit.pipelines.judges.get_arithmetic_judge`)."""

    digits: tuple[int, int] = (1, 5)
    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 192
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    seed: int = 0
    generative_aux: bool = True
    format_version: int = JUDGE_FORMAT_VERSION

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def folder(self) -> Path:
        """Where the trained judge is cached: `cache_dir("judges", "arithmetic-<key>")`."""
        return cache_dir("judges", f"arithmetic-{self.key()}")


__all__ = [
    "CORRUPTIONS",
    "ArithmeticJudgeConfig",
    "JUDGE_TEMPLATE",
    "NO",
    "YES",
    "check_text",
    "corrupt",
    "judge_samples",
    "judge_tokenizer",
    "parse_prompt",
]
