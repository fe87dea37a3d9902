"""A judge model's single-token verdict as a label-free reward (RL distillation with an LLM judge).

The judge is any causal LM with its own tokenizer. Each (prompt, completion) pair is written into a
template, e.g. ``"Question: {prompt}\\nAnswer: {completion}\\nIs the answer correct?"``, and the reward
is read from ONE forward pass at the template's last token: the probability the judge gives its
"yes" token next (or the log-odds of "yes" against "no"). No generation, no ground-truth label.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdkit.registry import REWARDS, Param
from kdkit.rewards.base import RewardInputs

JUDGE_OUTPUTS = ("prob", "normalised", "log_odds")


def load_judge(name: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a judge named in a config: "arithmetic" or a model folder / hub id."""
    from kdkit.models.lm import load_causal_lm

    if name == "arithmetic":
        from kdkit.tasks.arithmetic_judge import ArithmeticJudgeConfig

        folder = ArithmeticJudgeConfig().folder()
        if not (folder / "kdkit_judge.json").exists():
            raise FileNotFoundError(
                f"the arithmetic judge is not trained yet ({folder}); train it once with "
                "kdkit.pipelines.judges.get_arithmetic_judge() (a few CPU minutes)"
            )
        return load_causal_lm(folder)
    return load_causal_lm(name)


def _single_token_id(tokenizer: Any, text: str, role: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"the judge's {role} token {text!r} encodes to {len(ids)} tokens {ids}; choose a text the "
            "judge's tokenizer keeps as one token (e.g. ' yes' with a leading space for BPE vocabularies)"
        )
    return int(ids[0])


@REWARDS.register(
    "judge",
    "a judge LM's probability (or log-odds) of 'yes' after a grading template: no label, no generation",
    params={
        "judge": Param("the judge: 'arithmetic' (kdkit's cached arithmetic judge) or a model folder"),
        "template": Param("str.format template with {prompt} and {completion}"),
        "yes": Param("the verdict text read as the reward (one token of the judge's tokenizer)"),
        "no": Param("the opposite verdict (for 'normalised' and 'log_odds')"),
        "output": Param("what is returned", choices=JUDGE_OUTPUTS),
        "batch_size": Param("texts per judge forward pass", low=1),
    },
)
class JudgeReward:
    """Reward = the judge's next-token probability of `yes` after the filled template.

    judge: a causal LM (frozen here: eval mode, no grad), or a name: "arithmetic" loads kdkit's
        cached arithmetic judge (train it once with `kdkit.pipelines.judges.get_arithmetic_judge`),
        any other string a causal LM folder (or hub id) with its tokenizer.
    tokenizer: the judge's own (loaded with it when `judge` is a name).
    template: a str.format template with the fields {prompt} and {completion}.
    yes, no: the verdict texts (each must be one token of the judge's tokenizer); `no` is needed
        for "normalised" and gives "log_odds" its second term.
    output: "prob" p(yes) ∈ [0, 1]; "normalised" p(yes) / (p(yes) + p(no));
        "log_odds" log p(yes) − log p(no) (with no `no`: log p(yes) − log(1 − p(yes))).
    batch_size: texts per judge forward pass; max_length: longer filled templates are cut from the
        left (the verdict position, at the end, is kept) with a warning-free truncation.
    """

    needs_teacher = False

    def __init__(
        self,
        judge: nn.Module | str = "arithmetic",
        tokenizer: Any = None,
        *,
        template: str = "{prompt}{completion}?",
        yes: str = "Y",
        no: str | None = "N",
        output: str = "prob",
        batch_size: int = 64,
        max_length: int | None = None,
    ) -> None:
        if output not in JUDGE_OUTPUTS:
            raise ValueError(f"judge output must be one of {JUDGE_OUTPUTS}, got {output!r}")
        if output == "normalised" and no is None:
            raise ValueError("output='normalised' needs the judge's 'no' token")
        for field_name in ("{prompt}", "{completion}"):
            if field_name not in template:
                raise ValueError(f"the judge template must contain {field_name}, got {template!r}")
        if isinstance(judge, str):
            judge, tokenizer = load_judge(judge)
        if tokenizer is None:
            raise ValueError("a judge model needs its tokenizer (JudgeReward(model, tokenizer))")
        if tokenizer.pad_token_id is None:
            raise ValueError("the judge's tokenizer has no pad token; set tokenizer.pad_token")
        self.judge = judge.eval().requires_grad_(False)
        self.tokenizer, self.template, self.output = tokenizer, template, output
        self.yes_id = _single_token_id(tokenizer, yes, "yes")
        self.no_id = _single_token_id(tokenizer, no, "no") if no is not None else None
        self.batch_size, self.max_length = batch_size, max_length

    def texts(self, prompts: list[str], completions: list[str]) -> list[str]:
        return [self.template.format(prompt=p, completion=c) for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def verdict_log_probs(self, texts: list[str]) -> Tensor:
        """log softmax of the judge's next-token logits after each text: [N, V] float32."""
        device = next(self.judge.parameters()).device
        rows = []
        for start in range(0, len(texts), self.batch_size):
            encoded = [self.tokenizer(t)["input_ids"] for t in texts[start : start + self.batch_size]]
            if self.max_length is not None:
                encoded = [ids[-self.max_length :] for ids in encoded]
            lengths = torch.tensor([len(ids) for ids in encoded])
            width = int(lengths.max())
            pad = self.tokenizer.pad_token_id
            input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            for i, ids in enumerate(encoded):
                input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
            logits = self.judge(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits
            last = logits[torch.arange(len(encoded), device=device), (lengths - 1).to(device)]  # [n, V]
            rows.append(torch.log_softmax(last.float(), dim=-1))
        return torch.cat(rows)

    def from_log_probs(self, log_probs: Tensor) -> Tensor:
        """The reward [N] from the verdict log-probabilities [N, V] (see `output`)."""
        log_yes = log_probs[:, self.yes_id]
        if self.output == "prob":
            return log_yes.exp()
        if self.no_id is None:  # log-odds against "anything but yes"
            return log_yes - torch.log1p(-log_yes.exp().clamp(max=1 - 1e-7))
        log_no = log_probs[:, self.no_id]
        if self.output == "log_odds":
            return log_yes - log_no
        return torch.sigmoid(log_yes - log_no)  # p(yes) / (p(yes) + p(no))

    def __call__(self, inputs: RewardInputs) -> Tensor:
        texts = self.texts(inputs.prompts, inputs.completions)
        return self.from_log_probs(self.verdict_log_probs(texts)).cpu()


__all__ = ["JUDGE_OUTPUTS", "JudgeReward"]
