"""Empirical privacy audit of a trained LM: canary exposure and a loss-threshold membership attack.

Canaries (Carlini et al., "The Secret Sharer"): records "<prompt><secret>" with a random secret are
inserted into the private data `copies` times each. After training, every candidate secret of the
same format is scored by the model's log-likelihood given the canary's prompt; the true secret's
rank r among R candidates gives exposure = log2(R) − log2(r) bits (0 = no better than chance,
log2(R) = the model ranks the secret first). With more than `max_candidates` possible secrets a
uniform random subset (plus the true one) is ranked instead: an estimate of the same quantity.

Membership inference (Yeom et al.): score = −(mean NLL of a record's completion tokens); the AUC of
that score between training members and held-out non-members is 0.5 for a model that does not
depend on which records it saw, 1.0 for one that separates them perfectly.

Both are *lower bounds* on leakage (one attack each), never a proof of privacy: (ε, δ) is the proof.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from kdkit.data.padding import right_pad
from kdkit.losses.tokens import IGNORE_INDEX


@dataclass(frozen=True)
class Canary:
    """One planted record: the model sees `prompt + secret` `copies` times in its training data."""

    prompt: str
    secret: str
    copies: int

    def record(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": self.secret}


def make_canaries(
    n: int, *, copies: int, secret_length: int = 4, alphabet: str = "0123456789",
    prompt_template: str = "|{id}|", id_length: int = 4, seed: int = 0,
) -> list[Canary]:
    """`n` canaries with distinct random ids (in the prompt) and uniformly random secrets.

    prompt_template: "{id}" is replaced by `id_length` random characters of `alphabet`, so each
    canary has its own prompt. The secret space has len(alphabet) ** secret_length members.
    """
    if n > len(alphabet) ** id_length:
        raise ValueError(f"{n} canaries need more distinct ids than {len(alphabet)}^{id_length}")
    rng = random.Random(seed)
    ids: set[str] = set()
    canaries = []
    while len(canaries) < n:
        ident = "".join(rng.choice(alphabet) for _ in range(id_length))
        if ident in ids:
            continue
        ids.add(ident)
        secret = "".join(rng.choice(alphabet) for _ in range(secret_length))
        canaries.append(Canary(prompt_template.format(id=ident), secret, copies))
    return canaries


def insert_canaries(
    records: Sequence[dict[str, Any]], canaries: Sequence[Canary], seed: int = 0
) -> list[dict[str, Any]]:
    """The records with each canary's record added `copies` times, all shuffled (seeded)."""
    out = list(records) + [c.record() for c in canaries for _ in range(c.copies)]
    random.Random(seed).shuffle(out)
    return out


@torch.no_grad()
def completion_log_likelihoods(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], *,
    batch_size: int = 256, add_eos: bool = False, mean: bool = False,
) -> torch.Tensor:
    """log p(completion | prompt) under `model` for each pair: [n] float (nats; summed, or per token
    with mean=True). The prompt is tokenized with special tokens (BOS), the completion without."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows, labels = [], []
            window = slice(start, start + batch_size)
            for prompt, completion in zip(prompts[window], completions[window]):
                p = tokenizer(prompt)["input_ids"]
                c = tokenizer(completion, add_special_tokens=False)["input_ids"]
                if add_eos:
                    c = c + [tokenizer.eos_token_id]
                rows.append(p + c)
                labels.append([IGNORE_INDEX] * len(p) + c)
            ids = right_pad(rows, pad).to(device)
            mask = right_pad([[1] * len(r) for r in rows], pad, value=0).to(device)
            target = right_pad(labels, pad, value=IGNORE_INDEX).to(device)[:, 1:]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            counted = target != IGNORE_INDEX
            lp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            total = torch.where(counted, lp, lp.new_zeros(())).sum(-1)
            out.append((total / counted.sum(-1).clamp_min(1) if mean else total).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def exposure(
    model: nn.Module, tokenizer: Any, canary: Canary, *, alphabet: str = "0123456789",
    max_candidates: int = 10_000, seed: int = 0, batch_size: int = 512,
) -> dict[str, float]:
    """{"rank", "candidates", "exposure" (bits), "max_exposure"} of one canary's secret."""
    length = len(canary.secret)
    space = len(alphabet) ** length
    if space <= max_candidates:
        candidates = ["".join(t) for t in itertools.product(alphabet, repeat=length)]
    else:
        rng = random.Random(seed)
        others: set[str] = set()
        while len(others) < max_candidates - 1:
            guess = "".join(rng.choice(alphabet) for _ in range(length))
            if guess != canary.secret:
                others.add(guess)
        candidates = [canary.secret, *sorted(others)]
    scores = completion_log_likelihoods(model, tokenizer, [canary.prompt] * len(candidates), candidates,
                                        batch_size=batch_size)
    true_score = scores[candidates.index(canary.secret)]
    # ties count half: a model that scores every candidate equally gets the middle rank
    rank = 1.0 + float((scores > true_score).sum()) + 0.5 * float((scores == true_score).sum() - 1)
    count = len(candidates)
    return {"rank": rank, "candidates": float(count), "exposure": math.log2(count) - math.log2(rank),
            "max_exposure": math.log2(count)}


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a random positive > a random negative) + ½ P(tie): the ROC AUC (Mann–Whitney)."""
    positive, negative = positive.double().flatten(), negative.double().flatten()
    if positive.numel() == 0 or negative.numel() == 0:
        raise ValueError("the AUC needs at least one member and one non-member")
    greater = (positive[:, None] > negative[None, :]).double().mean()
    ties = (positive[:, None] == negative[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def membership_auc(
    model: nn.Module, tokenizer: Any, members: Sequence[dict[str, Any]],
    non_members: Sequence[dict[str, Any]],
    *, batch_size: int = 256,
) -> float:
    """Loss-threshold membership inference: AUC of −(mean completion NLL), members vs non-members."""
    def scores(rows: Sequence[dict[str, Any]]) -> torch.Tensor:
        return completion_log_likelihoods(model, tokenizer, [r["prompt"] for r in rows],
                                          [r["completion"] for r in rows], batch_size=batch_size,
                                          add_eos=True, mean=True)

    return auc(scores(members), scores(non_members))


def audit(
    model: nn.Module, tokenizer: Any, canaries: Sequence[Canary], members: Sequence[dict[str, Any]],
    non_members: Sequence[dict[str, Any]], *, alphabet: str = "0123456789", max_candidates: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Both attacks on one model: mean / max canary exposure (bits) and the membership AUC."""
    found = [exposure(model, tokenizer, c, alphabet=alphabet, max_candidates=max_candidates, seed=seed + i)
             for i, c in enumerate(canaries)]
    values = [f["exposure"] for f in found]
    return {
        "exposure_mean": sum(values) / len(values) if values else float("nan"),
        "exposure_max": max(values) if values else float("nan"),
        "exposure_ceiling": found[0]["max_exposure"] if found else float("nan"),
        "secrets_ranked_first": sum(f["rank"] == 1.0 for f in found),
        "canaries": len(found),
        "mia_auc": membership_auc(model, tokenizer, members, non_members),
        "per_canary": [asdict(c) | f for c, f in zip(canaries, found)],
    }
