"""The fused losses on every device: equal to the unfused loss in float32, close in bf16.

`cpu` always runs; `cuda` when a GPU is present (`pytest tests/losses -k cuda` there). `cpu-halfmm`
runs the GPU's half-precision matmul path (bf16 matmuls with float32 outputs, G cast to bf16 for the
gradient products) on the CPU by emulation, so its logic is checked without a GPU.

bf16 tolerance: the loss comes back in bf16 (unit roundoff u = 2^-9 ≈ 2e-3), so rtol 1e-2. Each
gradient comes back in bf16 (relative error ≤ u) and, on the half-precision path, is a sum over the
vocabulary of bf16-rounded d loss/d logits times the weights: its absolute error is ≤ u·Σ|G·W|, which
exceeds u·|gradient| where terms cancel. Measured: ≤ 2.8u of the gradient's largest entry. Hence
atol = 1e-2 × that largest entry (~5u) and rtol 1e-2; a wrong scale, chunk or index is O(1) off.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

from kdkit.losses import DIVERGENCES
from kdkit.losses import fused as fused_module
from kdkit.losses.fused import LinearHead, auto_chunk_size, fused_linear_divergence
from kdkit.losses.sparse import sparse_divergence, topk_target
from kdkit.losses.sparse_fused import fused_sparse_divergence
from tests.losses.test_fused import _fused

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    "cpu-halfmm",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]
N, V, H_S, H_T = 64, 300, 16, 24
CE_WEIGHT = 0.5


@pytest.fixture
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    name = request.param
    if name == "cpu-halfmm":
        monkeypatch.setattr(fused_module, "HALF_MATMUL_DEVICE_TYPES", {"cuda", "cpu"})
        monkeypatch.setattr(fused_module, "_HALF_MODES", {})
        return torch.device("cpu")
    return torch.device(name)


def _close_fp32(got: Tensor, expected: Tensor) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5)


def _close_bf16(got: Tensor, expected: Tensor) -> None:
    assert got.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, atol=1e-2 * scale, rtol=1e-2)


def _inputs(device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """(inputs in `dtype`, the same values in float32 as the reference's leaves, labels with -100)."""
    gen = torch.Generator().manual_seed(7)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    raw = {
        "student_hidden": randn(N, H_S),
        "student_weight": randn(V, H_S, scale=0.5),
        "student_bias": randn(V, scale=0.3),
        "teacher_hidden": randn(N, H_T),
        "teacher_weight": randn(V, H_T, scale=0.5),
        "teacher_bias": randn(V, scale=0.3),
    }
    learn = ("student_hidden", "student_weight", "student_bias")
    x = {k: v.to(device=device, dtype=dtype).requires_grad_(k in learn) for k, v in raw.items()}
    ref = {k: v.detach().float().requires_grad_(k in learn) for k, v in x.items()}
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.3] = -100  # ignore-index positions
    labels[16:24] = -100  # a whole chunk of them
    return x, ref, labels.to(device)


def _unfused(ref: dict[str, Tensor], labels: Tensor, name: str, temperature: float, **kwargs: Any) -> Tensor:
    mask = labels != -100
    logits_s = ref["student_hidden"] @ ref["student_weight"].T + ref["student_bias"]
    logits_t = ref["teacher_hidden"] @ ref["teacher_weight"].T + ref["teacher_bias"]
    kd = DIVERGENCES.get(name)(logits_s, logits_t, temperature=temperature, mask=mask, **kwargs)
    return kd + CE_WEIGHT * torch.nn.functional.cross_entropy(logits_s[mask], labels[mask])


def _grads(loss: Tensor, x: dict[str, Tensor]) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, (x["student_hidden"], x["student_weight"], x["student_bias"]))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "kwargs"), [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3})], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0])  # CE folded into the closed form / its own pass
def test_fused_with_ce_equals_unfused(
    device: torch.device, dtype: torch.dtype, name: str, kwargs: dict, temperature: float
) -> None:
    x, ref, labels = _inputs(device, dtype)
    expected = _unfused(ref, labels, name, temperature, **kwargs)
    got = _fused_ce(x, labels, name, temperature, **kwargs)  # several chunks, the last one partial
    assert got.device.type == device.type and got.dtype == dtype
    close = _close_fp32 if dtype == torch.float32 else _close_bf16
    close(got, expected)
    for g_fused, g_ref, leaf in zip(_grads(got, x), _grads(expected, ref), x.values()):
        assert g_fused.dtype == leaf.dtype and g_fused.device == leaf.device
        close(g_fused, g_ref)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["tail", "sampled"])
def test_sparse_fused_equals_materialised(device: torch.device, dtype: torch.dtype, kind: str) -> None:
    x, ref, labels = _inputs(device, dtype)
    mask = labels != -100
    teacher = (ref["teacher_hidden"] @ ref["teacher_weight"].T).detach()
    if kind == "tail":
        t = topk_target(teacher, 6, temperature=2.0)
        target = {"ids": t["ids"], "logprobs": t["logprobs"], "tail_logprob": t["tail_logprob"]}
        divergence, temperature = "jsd", 2.0
    else:
        from kdkit.losses.sparse import sampled_target

        gen = torch.Generator(device=device).manual_seed(3)
        t = sampled_target(teacher, 10, temperature=1.0, generator=gen)
        target = {"ids": t["ids"], "weights": t["weights"], "entropy": t["entropy"]}
        divergence, temperature = "fkl", 1.0
    head = LinearHead(x["student_weight"], x["student_bias"])
    ref_head = LinearHead(ref["student_weight"], ref["student_bias"])
    logits = ref_head.logits(ref["student_hidden"])
    kd = sparse_divergence(logits, **target, divergence=divergence, temperature=temperature, mask=mask)
    ce_weight = CE_WEIGHT if temperature == 1.0 else 0.0  # the sparse CE term is folded in at T = 1
    expected = kd + ce_weight * torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    out = fused_sparse_divergence(
        x["student_hidden"],
        head,
        **target,
        mask=mask,
        divergence=divergence,
        temperature=temperature,
        targets=labels.clamp_min(0),
        ce_weight=ce_weight,
        chunk_size=12,
    )
    close = _close_fp32 if dtype == torch.float32 else _close_bf16
    close(out.loss, expected)
    for g_fused, g_ref in zip(_grads(out.loss, x), _grads(expected, ref)):
        close(g_fused, g_ref)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_takes_the_half_precision_matmul_path() -> None:
    """bf16 inputs run bf16 matmuls with float32 outputs (else the loss runs at the fp32 rate)."""
    device = torch.device("cuda")
    assert fused_module._half_mode(device, torch.bfloat16) in ("addmm", "temp")
    assert fused_module._half_mode(device, torch.float32) is None
    budget = torch.cuda.get_device_properties(device).total_memory * fused_module.CUDA_CHUNK_FRACTION
    chunk = auto_chunk_size(10**6, 151_936, device=device)
    assert budget / 2 <= chunk * 151_936 * 4 <= max(budget, fused_module.MIN_CUDA_CHUNK_BYTES)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_host_synchronisations_do_not_grow_with_the_chunks() -> None:
    """A step synchronises with the host a fixed number of times (the mask's nonzero, the target
    check), never once per chunk."""
    x, _, labels = _inputs(torch.device("cuda"), torch.bfloat16)

    def syncs(chunk_size: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss = fused_linear_divergence(
                    x["student_hidden"],
                    x["student_weight"],
                    x["teacher_hidden"],
                    x["teacher_weight"],
                    divergence="jsd",
                    mask=labels != -100,
                    targets=labels.clamp_min(0),
                    ce_weight=CE_WEIGHT,
                    chunk_size=chunk_size,
                )
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(8)  # warm-up: the one-time probe of the matmul path synchronises too
    few, many = syncs(64), syncs(4)
    assert few == many <= 3, (few, many)


def _fused_ce(x: dict[str, Tensor], labels: Tensor, name: str, temperature: float, **kwargs: Any) -> Tensor:
    mask, targets = labels != -100, labels.clamp_min(0)
    return _fused(x, name, mask, temperature, targets=targets, ce_weight=CE_WEIGHT, chunk_size=12, **kwargs)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("name", "kwargs", "temperature"),
    [("fkl", {}, 1.0), ("rkl", {}, 1.0), ("jsd", {"beta": 0.3}, 1.0), ("jsd", {"beta": 0.5}, 2.0)],
    ids=str,
)
def test_functional_closed_forms_equal_unfused(
    device: torch.device,
    dtype: torch.dtype,
    name: str,
    kwargs: dict,
    temperature: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one-graph closed forms (what KDKIT_FUSED_COMPILE=1 compiles), run eagerly here: same math.

    (At T = 2 the CE term needs its own pass, so the eager forms run: the switch must not break it.)
    """
    monkeypatch.setattr(fused_module, "COMPILE_CLOSED_FORMS", True)
    calls: list[str] = []

    def eager(*args: Any) -> Any:
        calls.append(args[3])
        return fused_module._closed_functional(*args)

    monkeypatch.setattr(fused_module, "_COMPILED", {"fn": eager})
    x, ref, labels = _inputs(device, dtype)
    expected = _unfused(ref, labels, name, temperature, **kwargs)
    got = _fused_ce(x, labels, name, temperature, **kwargs)
    assert bool(calls) == (temperature == 1.0)
    close = _close_fp32 if dtype == torch.float32 else _close_bf16
    close(got, expected)
    for g_fused, g_ref in zip(_grads(got, x), _grads(expected, ref)):
        close(g_fused, g_ref)


def test_a_failing_compiler_falls_back_to_the_eager_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_module, "COMPILE_CLOSED_FORMS", True)

    def broken(*args: Any) -> Any:
        raise RuntimeError("no compiler here")

    state = {"fn": broken}
    monkeypatch.setattr(fused_module, "_COMPILED", state)
    x, ref, labels = _inputs(torch.device("cpu"), torch.float32)
    with pytest.warns(RuntimeWarning, match="running them eagerly"):
        got = _fused_ce(x, labels, "jsd", 1.0, beta=0.5)
    assert state["fn"] is None and "no compiler here" in state["error"]
    _close_fp32(got, _unfused(ref, labels, "jsd", 1.0, beta=0.5))
    for g_fused, g_ref in zip(_grads(got, x), _grads(_unfused(ref, labels, "jsd", 1.0, beta=0.5), ref)):
        _close_fp32(g_fused, g_ref)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_compiled_closed_form_equals_unfused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real torch.compile (Inductor/Triton) of the closed forms, once (bf16 jsd + CE: ~20-60 s)."""
    monkeypatch.setattr(fused_module, "COMPILE_CLOSED_FORMS", True)
    monkeypatch.setattr(fused_module, "_COMPILED", {})
    x, ref, labels = _inputs(torch.device("cuda"), torch.bfloat16)
    got = _fused_ce(x, labels, "jsd", 1.0, beta=0.3)
    assert fused_module._COMPILED.get("fn") is not None, fused_module._COMPILED.get("error")
    expected = _unfused(ref, labels, "jsd", 1.0, beta=0.3)
    _close_bf16(got, expected)
    for g_fused, g_ref in zip(_grads(got, x), _grads(expected, ref)):
        _close_bf16(g_fused, g_ref)


def test_the_chunk_math_is_compiled_by_default_only_for_16_bit_inputs_on_cuda(monkeypatch) -> None:
    """Default (KDKIT_FUSED_COMPILE unset): compiled where the eager memory passes dominate
    (CUDA, bf16/fp16), eager elsewhere; the setting overrides both ways."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(fused_module, "COMPILE_CLOSED_FORMS", None)
    assert fused_module._compile_wanted(cuda, torch.bfloat16)
    assert fused_module._compile_wanted(cuda, torch.float16)
    assert not fused_module._compile_wanted(cuda, torch.float32)
    assert not fused_module._compile_wanted(cpu, torch.bfloat16)
    monkeypatch.setattr(fused_module, "COMPILE_CLOSED_FORMS", False)
    assert not fused_module._compile_wanted(cuda, torch.bfloat16)
    monkeypatch.setattr(fused_module, "COMPILE_CLOSED_FORMS", True)
    assert fused_module._compile_wanted(cpu, torch.float32)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_under_autocast_the_matmuls_take_its_half_dtype(device: torch.device) -> None:
    """Mixed-precision training calls the fused loss with float32 weights under autocast. Where the
    device has the half-precision matmul path (CUDA; `cpu-halfmm` emulates it) the four matmuls
    take autocast's bf16, as the model's own lm_head would (a defect: they ran at the float32 rate),
    while the loss and the gradients stay float32: the loss equals the float32 loss of the
    bf16-rounded inputs. Elsewhere (plain CPU) nothing changes."""
    x, ref, labels = _inputs(device, torch.float32)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = _fused_ce(x, labels, "jsd", 1.0, beta=0.3)
    grads = _grads(got, x)
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    half_path = fused_module._half_mode(device, torch.bfloat16) is not None
    if half_path:  # the reference: the same inputs rounded to bf16, in float32, no autocast
        rounded = {
            k: (v.detach().to(torch.bfloat16).float() if "bias" not in k else v.detach()).requires_grad_(
                v.requires_grad
            )
            for k, v in x.items()
        }
        expected = _fused_ce(rounded, labels, "jsd", 1.0, beta=0.3)
        _close_fp32(got, expected)
        for g, e in zip(grads, _grads(expected, rounded)):  # G is rounded to bf16 before G·W, Gᵀ·h
            torch.testing.assert_close(g, e, atol=1e-2 * e.abs().max().item(), rtol=1e-2)
        assert not torch.allclose(got, _fused_ce(x, labels, "jsd", 1.0, beta=0.3), atol=1e-7, rtol=0)
    else:
        _close_fp32(got, _fused_ce(x, labels, "jsd", 1.0, beta=0.3))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_sparse_fused_under_autocast_takes_its_half_dtype(device: torch.device) -> None:
    """The sparse fused loss (a logit cache's targets) under autocast: float32 loss and gradients,
    matmuls in bf16 where the device has that path (= the float32 loss of bf16-rounded inputs)."""
    x, ref, labels = _inputs(device, torch.float32)
    teacher = (ref["teacher_hidden"] @ ref["teacher_weight"].T).detach()
    t = topk_target(teacher, 6)
    target = {"ids": t["ids"], "logprobs": t["logprobs"], "tail_logprob": t["tail_logprob"]}

    def loss(hidden: Tensor, weight: Tensor) -> Tensor:
        head = LinearHead(weight, x["student_bias"])
        return fused_sparse_divergence(hidden, head, **target, mask=labels != -100, chunk_size=12).loss

    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = loss(x["student_hidden"], x["student_weight"])
    assert got.dtype == torch.float32
    if fused_module._half_mode(device, torch.bfloat16) is not None:
        rounded = [x[k].detach().to(torch.bfloat16).float() for k in ("student_hidden", "student_weight")]
        _close_fp32(got, loss(*rounded))
    else:
        _close_fp32(got, loss(x["student_hidden"], x["student_weight"]))
