"""Audit arithmetic: exposure of a model that knows the secret, of one that knows nothing; the AUC."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdkit.privacy.audit import auc, exposure, insert_canaries, make_canaries, membership_auc


class _PositionTable(nn.Module):
    """Predicts token `sequence[t + 1]` at position t (strength `scale`): knows one sequence only."""

    def __init__(self, sequence, vocab, scale):
        super().__init__()
        self.sequence, self.vocab, self.scale = sequence, vocab, scale
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, self.vocab)
        for t in range(min(width, len(self.sequence)) - 1):
            logits[:, t, self.sequence[t + 1]] = self.scale
        return SimpleNamespace(logits=logits)


def test_exposure_is_maximal_when_the_secret_ranks_first_and_about_one_bit_for_chance(tokenizer):
    canary = make_canaries(1, copies=1, secret_length=3, seed=1)[0]
    secret = tokenizer(canary.secret, add_special_tokens=False)["input_ids"]
    ids = tokenizer(canary.prompt)["input_ids"] + secret
    knows = exposure(_PositionTable(ids, len(tokenizer), 10.0), tokenizer, canary)
    assert knows["candidates"] == 1000 and knows["rank"] == 1.0
    assert knows["exposure"] == pytest.approx(math.log2(1000))
    blind = exposure(_PositionTable(ids, len(tokenizer), 0.0), tokenizer, canary)  # uniform: all tie
    assert blind["exposure"] == pytest.approx(math.log2(1000) - math.log2(500.5))
    sampled = exposure(_PositionTable(ids, len(tokenizer), 10.0), tokenizer, canary, max_candidates=100)
    assert sampled["candidates"] == 100 and sampled["rank"] == 1.0


def test_canaries_are_distinct_and_inserted_copies_times():
    canaries = make_canaries(5, copies=3, seed=0)
    assert len({c.prompt for c in canaries}) == 5
    rows = insert_canaries([{"prompt": "1+1=", "completion": "2"}] * 10, canaries, seed=0)
    assert len(rows) == 25
    assert sum(r == canaries[0].record() for r in rows) == 3


def test_auc_matches_its_definition(tokenizer):
    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])) == 0.5
    assert auc(torch.tensor([2.0]), torch.tensor([2.0])) == 0.5
    rows = [{"prompt": "1+1=", "completion": "2"}]
    table = _PositionTable(tokenizer("1+1=2")["input_ids"], len(tokenizer), 5.0)
    assert membership_auc(table, tokenizer, rows, [{"prompt": "1+1=", "completion": "3"}]) == 1.0
