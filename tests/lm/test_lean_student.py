"""The student's forward through a trainable `LeanDecoder` (`StudentView`): the same logits and the
same gradient of every parameter as the model's own forward in training mode (every supported
family, padding on either side, the trained-logits window, the fused path's hidden states), and the
model's own forward wherever the lean one would differ."""

from __future__ import annotations

import pytest
import torch

from kdkit.objectives.lm import StudentView
from kdkit.samplers import fast_decode
from kdkit.samplers.fast_decode import LEAN_STUDENT_ENV, trainable_student_decoder
from tests.lm.test_fast_decode import CONFIGS, tiny
from tests.signals.test_lean_teacher import padded_batch, shared_prefix_batch


def _views(model, batch, monkeypatch):
    """(lean view, the model's own view) of the same batch."""
    lean = StudentView(model, batch)
    assert lean.lean is not None  # the lean path is the one tested
    monkeypatch.setenv(LEAN_STUDENT_ENV, "0")
    own = StudentView(model, batch)
    assert own.lean is None
    monkeypatch.delenv(LEAN_STUDENT_ENV)
    return lean, own


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(model, lean_loss, own_loss) -> None:
    lean, own = _grads(model, lean_loss), _grads(model, own_loss)
    assert lean.keys() == own.keys() == {n for n, _ in model.named_parameters()}
    for name in own:
        torch.testing.assert_close(lean[name], own[name], rtol=0, atol=1e-5, msg=name)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A completion loss over the trained positions (labels shifted, as the objectives do), with
    weights that differ per position and per vocabulary entry, so every gradient is exercised."""
    shifted = labels[:, 1:] if logits.shape[1] == labels.shape[1] else labels
    logits = logits[:, :-1] if logits.shape[1] == labels.shape[1] else logits
    keep = shifted != -100
    weights = torch.linspace(0.5, 1.5, logits.shape[-1], device=logits.device)
    return (logits.log_softmax(-1)[keep] * weights).mean() + torch.nn.functional.cross_entropy(
        logits[keep], shifted[keep]
    )


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padding", ["right", "left", "shared-prefix"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "model-matrices"])
def test_lean_student_logits_and_every_gradient_equal_the_model_forward(name, padding, fuse, monkeypatch):
    """shared-prefix: rows sharing their first 12 tokens (computed once for one row) right-padded."""
    if not fuse:
        monkeypatch.setattr(fast_decode, "TRAINABLE_FUSE_MAX_WIDTH", 0)
    model_type, extra = CONFIGS[name]
    model = tiny(model_type, **extra).train()
    if padding == "shared-prefix":
        system = torch.randint(3, 40, (12,), generator=torch.Generator().manual_seed(5)).tolist()
        batch = shared_prefix_batch(system, [6, 3, 5], seed=1)
    else:
        batch = padded_batch(padding)
    tokens = batch["attention_mask"].bool()
    lean, own = _views(model, batch, monkeypatch)
    torch.testing.assert_close(lean.logits[tokens], own.logits[tokens], rtol=0, atol=1e-5)
    labels = batch["labels"]
    _assert_same_grads(model, _loss(lean.logits, labels), _loss(own.logits, labels))

    # the trained-logits window (positions from `start` only) and the fused path's hidden states
    lean, own = _views(model, batch, monkeypatch)
    (lean_window, window_labels), (own_window, _) = lean.trained_logits, own.trained_logits
    assert lean.start > 0 and lean_window.shape == own_window.shape
    _assert_same_grads(model, _loss(lean_window, window_labels), _loss(own_window, window_labels))
    lean, own = _views(model, batch, monkeypatch)
    (lean_hidden, head), (own_hidden, _) = lean.hidden, own.hidden
    torch.testing.assert_close(lean_hidden[tokens], own_hidden[tokens], rtol=0, atol=1e-5)
    _assert_same_grads(model, _loss(head.logits(lean_hidden), labels), _loss(head.logits(own_hidden), labels))


def test_training_through_the_engine_gives_the_weights_of_the_model_forward(tmp_path, monkeypatch):
    """3 AdamW steps of forward-KL + CE distillation (right-padded batches, the collator's side):
    the same weights with the lean student forward as with the model's own, which is the one
    that ran in training (the student's `LeanDecoder.hidden` ran with gradients)."""
    from kdkit.engine import TrainConfig, train
    from kdkit.methods.lm_distiller import LMDistiller

    batches = [padded_batch("right") for _ in range(4)]
    records = [{k: v[i] for k, v in b.items()} for b in batches for i in range(3)]
    cfg = TrainConfig(
        steps=3,
        batch_size=6,
        optimizer="adamw",
        lr=1e-2,
        schedule="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        checkpoint_every=100,
        log_every=1,
        progress=False,
        mixed_precision="no",
        seed=3,
    )
    trained_lean = []
    hidden = fast_decode.LeanDecoder.hidden

    def spy(self, *args, **kwargs):
        trained_lean.append(torch.is_grad_enabled())
        return hidden(self, *args, **kwargs)

    monkeypatch.setattr(fast_decode.LeanDecoder, "hidden", spy)
    weights = {}
    for lean in ("1", "0"):
        monkeypatch.setenv(LEAN_STUDENT_ENV, lean)
        student, teacher = tiny("qwen2", num_key_value_heads=2).train(), tiny("qwen2", seed=1)
        distiller = LMDistiller(student, teacher, kd_weight=1.0, ce_weight=0.5)
        train(distiller, records, cfg, tmp_path / lean)
        weights[lean] = {n: p.detach().clone() for n, p in distiller.student.named_parameters()}
        assert any(trained_lean) == (lean == "1")  # the student ran lean (the teacher's runs without grad)
        trained_lean.clear()
    for name, value in weights["0"].items():
        assert not torch.equal(value, tiny("qwen2", num_key_value_heads=2).state_dict()[name]), name
        torch.testing.assert_close(weights["1"][name], value, rtol=0, atol=1e-5, msg=name)


def _refusal(model, device_type: str = "cpu") -> bool:
    return trainable_student_decoder(model, device_type) is None


def test_the_model_forward_runs_where_the_lean_one_would_differ(monkeypatch, caplog):
    model = tiny("llama").train()
    assert not _refusal(model)
    monkeypatch.setattr(fast_decode, "_logged", set())
    monkeypatch.setenv(LEAN_STUDENT_ENV, "off")
    with caplog.at_level("DEBUG", logger=fast_decode.__name__):
        assert _refusal(model) and _refusal(model)
    assert [r.getMessage() for r in caplog.records].count(
        f"kdkit student forward: the model's own forward runs: {LEAN_STUDENT_ENV} is off"
    ) == 1  # logged once
    monkeypatch.delenv(LEAN_STUDENT_ENV)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _refusal(model)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert _refusal(model)
    dropout = tiny("llama", attention_dropout=0.1).train()
    assert _refusal(dropout) and not _refusal(dropout.eval())  # dropout only acts in training mode
    hooked = tiny("llama").train()
    handle = hooked.model.layers[1].mlp.register_forward_hook(lambda *a: None)  # Opacus-style hooks
    assert _refusal(hooked)
    handle.remove()
    assert not _refusal(hooked)
    sliding = tiny("mistral", sliding_window=4).train()
    assert _refusal(sliding)


def test_a_peft_adapter_runs_through_the_model_forward_and_trains() -> None:
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(tiny("llama").train(), lora)
    batch = padded_batch("right")
    view = StudentView(model, batch)
    assert view.lean is None
    view.logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen3-qk-norm"])
def test_lean_student_gradients_on_cuda(name, monkeypatch):
    """The same check on a GPU (float32, TF32 off: torch's default), right padding."""
    model_type, extra = CONFIGS[name]
    model = tiny(model_type, **extra).train().cuda()
    batch = padded_batch("right", "cuda")
    lean, own = _views(model, batch, monkeypatch)
    tokens = batch["attention_mask"].bool()
    torch.testing.assert_close(lean.logits[tokens], own.logits[tokens], rtol=0, atol=1e-5)
    labels = batch["labels"]
    _assert_same_grads(model, _loss(lean.logits, labels), _loss(own.logits, labels))
