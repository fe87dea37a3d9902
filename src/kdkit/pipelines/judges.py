"""The arithmetic judge, trained from scratch on labelled worked solutions and cached.

The labelled data, the verdict tokens and the template are `kdkit.tasks.arithmetic_judge`; this
module trains the judge (a tiny Llama over the judge's characters, like the arithmetic teacher) with
kdkit's engine and caches it as a plain Hugging Face folder under
`cache_dir("judges", "arithmetic-<hash of config>")`, with its own held-out accuracy in
`kdkit_judge.json`. Use it as a reward with `kdkit.rewards.JudgeReward(judge, tokenizer)`, or in a
config as `reward: judge, judge: arithmetic`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.pipelines.teachers import load_or_build_lm, train_tiny_lm
from kdkit.rewards.judge import JudgeReward
from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.tasks.arithmetic_judge import (
    JUDGE_TEMPLATE,
    NO,
    YES,
    ArithmeticJudgeConfig,
    judge_samples,
    judge_tokenizer,
)

log = logging.getLogger(__name__)


@torch.no_grad()
def judge_accuracy(judge: nn.Module, tokenizer: Any, samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of argmax(p(Y), p(N)) against the labels, overall and by operand length."""
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
    config = config or ArithmeticJudgeConfig()
    folder = config.folder()

    def build() -> tuple[nn.Module, Any]:
        tokenizer = judge_tokenizer()
        n = config.steps * config.batch_size
        samples = judge_samples(n, config.digits, seed=config.seed, generative_aux=config.generative_aux)
        # no EOS after the verdict: the judge is read at the verdict position only
        model, seconds = train_tiny_lm(
            tokenizer,
            config,
            samples,
            folder / "run",
            progress=progress,
            collate_fn=PromptCompletionCollator(tokenizer, add_eos=False),
        )
        model = model.eval()
        held_out = judge_samples(1000, (config.digits[0], config.digits[1] + 1), seed=20_000 + config.seed)
        accuracy = judge_accuracy(model, tokenizer, held_out)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        info = {
            "config": asdict(config),
            "train_seconds": seconds,
            "accuracy": accuracy,
            "template": JUDGE_TEMPLATE,
            "yes": YES,
            "no": NO,
        }
        (folder / "kdkit_judge.json").write_text(json.dumps(info, indent=2))
        log.info("arithmetic judge trained in %.0f s: accuracy %s", seconds, accuracy)
        return model, tokenizer

    return (*load_or_build_lm(folder, "kdkit_judge.json", build, retrain=retrain), folder)


__all__ = ["ArithmeticJudgeConfig", "get_arithmetic_judge", "judge_accuracy"]
