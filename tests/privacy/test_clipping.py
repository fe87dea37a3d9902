"""Per-example clipping holds in the DP mode: each clipped gradient has norm ≤ C, the batch update is
the sum of the per-example clipped gradients, and changing one record changes only its own."""

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from kdkit.methods.private_distiller import PrivateLMDistiller
from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.samplers.generation import GenerationSettings


def _distiller(tiny_lm, tokenizer, mode):
    teacher = None if mode == "ft" else tiny_lm(1)
    settings = GenerationSettings(max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    return PrivateLMDistiller(tiny_lm(2), teacher, mode=mode, generation=settings)


def _clipped_sum(distiller, batch, C, seed=0):
    """Opacus' clipped, summed, noise-free gradient of `batch` (flattened) and its per-example grads."""
    model = copy.deepcopy(distiller)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=C,
                      expected_batch_size=1, loss_reduction="mean")
    torch.manual_seed(seed)
    out = gsm(batch)
    next(v for k, v in out.items() if not k.startswith("_")).backward()
    per_example = torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in params], 1)
    opt.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.reshape(-1) for p in params])
    return summed, per_example


@pytest.mark.parametrize("mode", ["ft", "kd", "opd"])
def test_clipped_gradients_are_per_example(tiny_lm, tokenizer, records, mode):
    collate = PromptCompletionCollator(tokenizer)
    distiller = _distiller(tiny_lm, tokenizer, mode)
    rows = records[:5]
    batch = collate(rows)
    _, unclipped = _clipped_sum(distiller, batch, 1.0)
    C = 0.5 * float(unclipped.norm(dim=1).min())  # every example gets clipped
    summed, per_example = _clipped_sum(distiller, batch, C)
    assert per_example.shape[0] == 5

    # each example alone: its clipped gradient has norm <= C, and the batch sums them exactly
    alone = [_clipped_sum(distiller, collate([row]), C)[0] for row in rows]
    for clipped in alone:
        assert C * 0.99 <= clipped.norm() <= C * (1 + 1e-5)
    if mode != "opd":  # rollouts of a batch and of a single row use different random draws
        torch.testing.assert_close(summed, torch.stack(alone).sum(0), rtol=1e-4, atol=1e-7)

    # change record 2 only (same lengths): only its per-example gradient moves
    changed = list(rows)
    changed[2] = {**rows[2], "prompt": rows[2]["prompt"][::-1], "completion": rows[2]["completion"][::-1]}
    summed2, per_example2 = _clipped_sum(distiller, collate(changed), C)
    others = [0, 1, 3, 4]
    torch.testing.assert_close(per_example2[others], per_example[others], rtol=1e-4, atol=1e-6)
    assert (per_example2[2] - per_example[2]).norm() > 1e-3 * per_example[2].norm()
    difference = summed2 - summed  # = clip(g2') - clip(g2): at most 2C
    assert difference.norm() <= 2 * C * (1 + 1e-5)


def test_per_example_gradient_equals_the_gradient_of_that_example_alone(tiny_lm, tokenizer, records):
    collate = PromptCompletionCollator(tokenizer)
    distiller = _distiller(tiny_lm, tokenizer, "kd")
    _, per_example = _clipped_sum(distiller, collate(records[:4]), 1e9)
    for i in range(4):
        model = copy.deepcopy(distiller)
        loss = model(collate([records[i]]))["kd"]
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        torch.testing.assert_close(per_example[i], torch.cat([g.reshape(-1) for g in grads]),
                                   rtol=1e-4, atol=1e-7)
