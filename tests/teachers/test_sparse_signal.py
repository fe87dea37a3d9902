"""A served teacher's top-k log-probs as a sparse target, checked against the model's dense logits."""

from __future__ import annotations

import pytest
import torch

from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.teachers import HFTeacher, OpenAITeacher
from kdkit.teachers.sparse import LOGIT_FLOOR, served_sparse_target, token_id
from tests.teachers.server import TinyLMServer

SAMPLES = [
    {"prompt": "12+34=", "completion": "2+4+0=06|1+3+0=04|=46"},
    {"prompt": "5+5=", "completion": "5+5+0=10|=10"},
]


@pytest.mark.parametrize("backend", ["served", "local"])
def test_sparse_target_equals_the_dense_top_k(backend: str, server: TinyLMServer, tiny_lm) -> None:
    model, tok = tiny_lm
    batch = PromptCompletionCollator(tok)(SAMPLES)
    teacher = OpenAITeacher(server.url, "tiny") if backend == "served" else HFTeacher(model, tok)
    k = 4
    target = served_sparse_target(teacher, tok, batch, k)
    with torch.no_grad():
        dense = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_p = dense[:, :-1].log_softmax(-1)
    mask = batch["labels"][:, 1:] != -100  # EOS included: the completion is scored with it
    assert torch.equal(target["mask"], mask)
    top_values, top_ids = log_p.topk(k, dim=-1)
    assert torch.equal(target["ids"][mask], top_ids[mask])
    assert torch.allclose(target["logprobs"][mask], top_values[mask], atol=1e-4)
    tail = torch.log1p(-top_values.exp().sum(-1))
    assert torch.allclose(target["tail_logprob"][mask], tail[mask], atol=1e-4)
    assert (target["logprobs"][~mask] == LOGIT_FLOOR).all()


def test_unknown_served_tokens_are_a_tokenizer_mismatch(tiny_lm) -> None:
    _, tok = tiny_lm
    assert token_id(tok, "token_id:7") == 7 and token_id(tok, "+") == tok.convert_tokens_to_ids("+")
    with pytest.raises(ValueError, match="tokenizer differs"):
        token_id(tok, "Ġhello")


def test_served_signal_is_registered_and_gives_a_sparse_target(tiny_lm) -> None:
    from kdkit.registry import TEACHER_SIGNALS, load_builtins
    from kdkit.settings import LMContext

    load_builtins()

    model, tok = tiny_lm
    entry = TEACHER_SIGNALS.get("served")
    signal = entry(entry.Params(top_k=3), LMContext.from_tokenizer(tok), teacher=HFTeacher(model, tok))
    assert not signal.needs_teacher_model and signal.provides == "sparse"
    batch = PromptCompletionCollator(tok)(SAMPLES)
    target = signal(batch, teacher=None)
    assert target.kinds() == ("sparse",) and target.sparse.ids.shape == (*batch["labels"][:, 1:].shape, 3)
    with torch.no_grad():
        lp = (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            .logits[:, :-1]
            .log_softmax(-1)
        )
    mask = batch["labels"][:, 1:] != -100
    assert torch.allclose(target.sparse.logprobs[mask], lp.topk(3, dim=-1).values[mask], atol=1e-4)
