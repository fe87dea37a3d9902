"""A judge for the arithmetic task, trained from scratch: does this worked solution reach the right sum?

The judge is a tiny causal LM over the arithmetic characters plus "?", "Y", "N". It reads
``"{prompt}{completion}?"`` (e.g. ``"12+79=2+9+0=11|1+7+1=09|=91?"``) and predicts "Y" when the final
answer is the true sum, else "N" — the label the task's checker gives. It is trained on worked
solutions labelled correct/incorrect: half are right, half are corrupted the ways a student errs
(a wrong column sum carried consistently to the answer, a dropped carry, a misread operand digit,
a wrong final answer under right steps, a solution cut short). Cached like the arithmetic teacher,
as a plain Hugging Face folder under `cache_dir("judges", "arithmetic-<hash>")`, with its own
held-out accuracy in `kdkit_judge.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.paths import cache_dir
from kdkit.tasks.arithmetic import CHARACTERS, EOS, PAD, Problem, build_arithmetic_lm, make_problems
from kdkit.tasks.text_tokenizer import char_tokenizer

log = logging.getLogger(__name__)

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


def _steps(digits_a: list[int], digits_b: list[int], *, bad_step: int | None = None, delta: int = 0,
           drop_carry: int | None = None) -> tuple[str, int]:
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


# --------------------------------------------------------------------------- the cached judge


@dataclass
class ArithmeticJudgeConfig:
    """Everything that determines the cached judge; its hash names the cache folder."""

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


@torch.no_grad()
def judge_accuracy(judge: nn.Module, tokenizer: Any, samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of argmax(p(Y), p(N)) against the labels, overall and by operand length."""
    from kdkit.rewards.judge import JudgeReward

    reward = JudgeReward(judge, tokenizer, template="{prompt}{completion}", yes=YES, no=NO, output="log_odds")
    scores = reward.verdict_log_probs([s["prompt"] for s in samples])
    verdict = (scores[:, reward.yes_id] > scores[:, reward.no_id]).long().tolist()
    hits: dict[str, list[int]] = {"all": []}
    for sample, v in zip(samples, verdict):
        ok = int(v == sample["label"])
        hits["all"].append(ok)
        hits.setdefault(f"digits_{sample['digits']}", []).append(ok)
        hits.setdefault("correct" if sample["label"] else "incorrect", []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def get_arithmetic_judge(
    config: ArithmeticJudgeConfig | None = None, *, retrain: bool = False, progress: bool = True
) -> tuple[nn.Module, Any, Path]:
    """The arithmetic judge, trained from scratch on first use and cached; (model, tokenizer, folder).

    `<folder>/kdkit_judge.json` holds the config, training seconds and the judge's accuracy on 1000
    held-out labelled solutions (lengths up to one past the training range).
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from kdkit.samplers.collate import PromptCompletionCollator
    from kdkit.tasks.arithmetic import train_causal_lm

    config = config or ArithmeticJudgeConfig()
    folder = cache_dir("judges", f"arithmetic-{config.key()}")
    if (folder / "kdkit_judge.json").exists() and not retrain:
        model = AutoModelForCausalLM.from_pretrained(folder)
        return model.eval(), PreTrainedTokenizerFast.from_pretrained(folder), folder
    tokenizer = judge_tokenizer()
    model = build_arithmetic_lm(
        tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
        num_heads=config.num_heads, intermediate_size=config.intermediate_size, seed=config.seed,
    )
    n = config.steps * config.batch_size
    samples = judge_samples(n, config.digits, seed=config.seed, generative_aux=config.generative_aux)
    started = time.perf_counter()
    # the verdict is the only trained token (no EOS after it)
    train_causal_lm(model, tokenizer, samples, config, folder / "run", progress=progress,  # type: ignore[arg-type]
                    collate_fn=PromptCompletionCollator(tokenizer, add_eos=False))
    seconds = time.perf_counter() - started
    model = model.eval()
    held_out = judge_samples(1000, (config.digits[0], config.digits[1] + 1), seed=20_000 + config.seed)
    accuracy = judge_accuracy(model, tokenizer, held_out)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"config": asdict(config), "train_seconds": seconds, "accuracy": accuracy,
            "template": JUDGE_TEMPLATE, "yes": YES, "no": NO}
    (folder / "kdkit_judge.json").write_text(json.dumps(info, indent=2))
    log.info("arithmetic judge trained in %.0f s: accuracy %s", seconds, accuracy)
    return model, tokenizer, folder


__all__ = [
    "CORRUPTIONS",
    "JUDGE_TEMPLATE",
    "NO",
    "YES",
    "ArithmeticJudgeConfig",
    "check_text",
    "corrupt",
    "get_arithmetic_judge",
    "judge_accuracy",
    "judge_samples",
    "judge_tokenizer",
    "parse_prompt",
]
