"""The chunked sparse loss from hidden states equals `sparse_divergence` on materialised logits."""

import pytest
import torch

from kdkit.losses.fused import LinearHead, LogitTransform
from kdkit.losses.sparse import sampled_target, sparse_divergence, topk_target
from kdkit.losses.sparse_fused import fused_sparse_divergence

V, H, B, T, K = 50, 8, 3, 7, 5


def _setup(seed=0, transform=None, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    teacher = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    return hidden, LinearHead(weight, b, transform or LogitTransform()), teacher, mask


def _grads(loss, head, hidden):
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    return torch.autograd.grad(loss, params)


def _target(kind, teacher, temperature):
    if kind == "sampled":
        t = sampled_target(teacher, 12, temperature=temperature, generator=torch.Generator().manual_seed(1))
        return {"ids": t["ids"], "weights": t["weights"], "entropy": t["entropy"]}
    t = topk_target(teacher, K, temperature=temperature)
    out = {"ids": t["ids"], "logprobs": t["logprobs"].clone()}
    out["logprobs"][0, :, -2:] = -1e30  # padding slots (a served teacher with fewer than K ids)
    if kind == "tail":
        out["tail_logprob"] = t["tail_logprob"]
    return out


@pytest.mark.parametrize(
    "kind, divergence, kwargs",
    [
        ("tail", "fkl", {}),
        ("tail", "rkl", {}),
        ("tail", "jsd", {"beta": 0.3}),
        ("tail", "tvd", {}),
        ("renorm", "fkl", {}),
        ("renorm", "jsd", {}),
        ("sampled", "fkl", {}),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_values_and_gradients_equal_the_materialised_loss(kind, divergence, kwargs, temperature):
    hidden, head, teacher, mask = _setup()
    target = _target(kind, teacher, temperature)
    ref = sparse_divergence(
        head.logits(hidden), **target, divergence=divergence, temperature=temperature, mask=mask, **kwargs
    )
    out = fused_sparse_divergence(
        hidden,
        head,
        **target,
        mask=mask,
        divergence=divergence,
        temperature=temperature,
        chunk_size=4,
        **kwargs,
    )
    torch.testing.assert_close(out.loss, ref)
    for a, b in zip(_grads(out.loss, head, hidden), _grads(ref, head, hidden), strict=True):
        torch.testing.assert_close(a, b)


def test_softcap_ce_term_and_float32_chunks():
    hidden, head, teacher, mask = _setup(seed=3, transform=LogitTransform(scale=0.7, softcap=5.0), bias=False)
    target = _target("tail", teacher, 1.0)
    labels = torch.randint(0, V, (B, T))
    logits = head.logits(hidden)
    kd = sparse_divergence(logits, **target, mask=mask)
    ce = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    out = fused_sparse_divergence(
        hidden, head, **target, mask=mask, targets=labels, ce_weight=0.5, chunk_size=3
    )
    torch.testing.assert_close(out.divergence, kd.detach())
    torch.testing.assert_close(out.ce, ce.detach())
    for a, b in zip(_grads(out.loss, head, hidden), _grads(kd + 0.5 * ce, head, hidden), strict=True):
        torch.testing.assert_close(a, b)
    # float32 inputs: same values to float32 rounding, whatever the chunk size
    h32 = hidden.detach().float()
    head32 = LinearHead(head.weight.detach().float(), None, head.transform)
    a = fused_sparse_divergence(h32, head32, **target, mask=mask, chunk_size=2).loss
    b = fused_sparse_divergence(h32, head32, **target, mask=mask, chunk_size=64).loss
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.double(), kd.detach(), rtol=1e-5, atol=1e-5)


def test_refuses_what_a_sparse_target_cannot_give():
    hidden, head, teacher, mask = _setup()
    with pytest.raises(ValueError, match="forward KL only"):
        fused_sparse_divergence(hidden, head, **_target("sampled", teacher, 1.0), divergence="rkl")
    with pytest.raises(ValueError, match="inf"):
        fused_sparse_divergence(hidden, head, **_target("renorm", teacher, 1.0), divergence="rkl")
