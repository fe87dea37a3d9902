"""A served teacher's top-k log-probs as a sparse teacher target, live (also on-policy).

Given an LM batch (any sampler: dataset, teacher or the student's own samples), the completion of
each row is sent to the teacher with its prompt for scoring (``echo`` + ``logprobs``, as vLLM
offers); the top-k log-probs at every completion position become the same sparse target as the
logit cache's (`kdkit.losses.sparse`): ``ids`` / ``logprobs`` [B, T-1, K] aligned with the shifted
positions (position t predicts token t+1), ``tail_logprob`` [B, T-1] = log of the teacher's mass
outside the kept ids, and ``mask`` [B, T-1] (True where the teacher scored the position). Slots a
position does not fill are padding: id 0, log-prob LOGIT_FLOOR.

Teacher and student must share the tokenizer (the served tokens are mapped back to ids and checked
against the batch's labels; a mismatch is an error, never a silent misalignment). Servers that can
name tokens by id (vLLM's ``return_tokens_as_token_ids``: "token_id:123") are read exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kdkit.losses.tokens import IGNORE_INDEX
from kdkit.teachers.base import TextTeacher

LOGIT_FLOOR = -1e30  # as kdkit.losses.divergences.LOGIT_FLOOR


def token_id(tokenizer: Any, token: str) -> int:
    """The vocabulary id of a served token name ("token_id:123" or the tokenizer's token string)."""
    if token.startswith("token_id:"):
        return int(token.removeprefix("token_id:"))
    index = tokenizer.convert_tokens_to_ids(token)
    if index is None or (index == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"the served token {token!r} is not in the student's vocabulary: the teacher's tokenizer "
            "differs (ask the server for token ids, e.g. vLLM's return_tokens_as_token_ids=true)"
        )
    return int(index)


def served_sparse_target(
    teacher: TextTeacher, tokenizer: Any, batch: dict[str, Tensor], k: int
) -> dict[str, Tensor]:
    """Score every row's completion with `teacher` and return the sparse target (module docstring).

    batch: input_ids / attention_mask / labels [B, T] (labels -100 off the completion, which is
    one contiguous run per row). k: top log-probs per position (the server's limit applies).
    """
    if not teacher.can_score:
        raise ValueError(
            f"{type(teacher).__name__} cannot score given text; a served signal needs echo scoring"
        )
    input_ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    rows, width = labels.shape
    prompts, completions, positions = [], [], []
    for row in range(rows):
        trained = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        if len(trained) == 0:
            prompts.append(None)
            completions.append(None)
            positions.append(trained)
            continue
        start = int(trained[0])
        prompts.append(tokenizer.decode(input_ids[row, :start].tolist(), skip_special_tokens=True))
        completions.append(tokenizer.decode(labels[row, trained].tolist(), skip_special_tokens=False))
        positions.append(trained - 1)  # shifted: position t predicts token t+1
    todo = [i for i, p in enumerate(prompts) if p is not None]
    scored = teacher.score([prompts[i] for i in todo], [completions[i] for i in todo], top_logprobs=k)
    ids = torch.zeros(rows, width - 1, k, dtype=torch.long)
    logprobs = torch.full((rows, width - 1, k), LOGIT_FLOOR)
    tail = torch.zeros(rows, width - 1)
    mask = torch.zeros(rows, width - 1, dtype=torch.bool)
    for row, result in zip(todo, scored):
        wanted = labels[row, positions[row] + 1].tolist()
        got = [token_id(tokenizer, t) for t in result.tokens]
        if got != wanted:
            raise ValueError(
                f"row {row}: the teacher tokenized the completion differently ({len(got)} tokens vs "
                f"{len(wanted)}); teacher and student must share the tokenizer"
            )
        if result.top_logprobs is None:
            raise ValueError(
                "the teacher returned no top log-probs (is k > 0 and does the server offer them?)"
            )
        for position, top in zip(positions[row].tolist(), result.top_logprobs):
            ranked = sorted(top.items(), key=lambda item: -item[1])[:k]
            for slot, (token, value) in enumerate(ranked):
                ids[row, position, slot] = token_id(tokenizer, token)
                logprobs[row, position, slot] = value
            kept = sum(math.exp(v) for _, v in ranked)
            tail[row, position] = math.log1p(-kept) if kept < 1.0 else LOGIT_FLOOR
            mask[row, position] = True
    device = batch["labels"].device
    return {
        "ids": ids.to(device),
        "logprobs": logprobs.to(device),
        "tail_logprob": tail.to(device),
        "mask": mask.to(device),
    }


__all__ = ["served_sparse_target", "token_id"]
