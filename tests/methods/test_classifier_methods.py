"""Classifier objective terms, feature hooks, the distiller and the methods."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.config.classifier import ClassifierStudentRun
from kdkit.losses import DIVERGENCES
from kdkit.methods import ClassifierDistiller, classifier_method
from kdkit.models.hooks import FeatureHooks
from kdkit.models.vision import build_vision_model
from kdkit.objectives.classifier import Outputs, build_objective
from kdkit.registry import METHODS, OBJECTIVES
from kdkit.specs import ObjectiveSpec


def method_entries(name: str, **params) -> list[dict]:
    method = classifier_method(name)
    return method.objectives(method.params(params))


def _logits(b: int = 6, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, c, generator=g),
        torch.randn(b, c, generator=g) * 2,
        torch.randint(0, c, (b,), generator=g),
    )


def _terms(name: str, out: Outputs, **params) -> dict[str, torch.Tensor]:
    return build_objective({"name": name, **params}).terms(out)


def test_every_documented_objective_and_method_is_registered():
    for name in ("ce", "kd", "dkd", "fitnet", "at", "dist"):
        assert name in OBJECTIVES
    for name in ("scratch", "kd", "dkd", "fitnet", "at", "dist"):
        assert method_entries(name)
    assert "scratch" in METHODS


def test_kd_method_is_one_ce_term_and_one_soft_term():
    # hard-label cross-entropy is the one `ce` term, weighted 1 − α; α = 0 is cross-entropy alone
    assert method_entries("kd", alpha=0.0, temperature=3.0) == [{"name": "ce", "weight": 1.0}]
    entries = method_entries("kd", alpha=0.7, temperature=3.0)
    assert [(e["name"], e["weight"]) for e in entries] == [("ce", pytest.approx(0.3)), ("kd", 0.7)]
    assert entries[1]["temperature"] == 3.0 and entries[1]["divergence"] == "fkl"
    assert [e["name"] for e in method_entries("kd", alpha=1.0)] == ["kd"]


@pytest.mark.parametrize("name", ["rkl", "jsd", "tvd", "skl"])
def test_kd_takes_any_divergence(name: str):
    s, t, y = _logits()
    terms = _terms("kd", Outputs(s, y, t), temperature=2.0, divergence=name, t2_scaling=False)
    expected = DIVERGENCES.get(name)(s, t, temperature=2.0)
    assert torch.allclose(terms["kd"], expected) and float(terms["kd"]) > 0
    jsd = _terms("kd", Outputs(s, y, t), temperature=2.0, divergence="jsd", beta=0.2, t2_scaling=False)
    assert torch.allclose(jsd["kd"], DIVERGENCES.get("jsd")(s, t, temperature=2.0, beta=0.2))


def test_kd_matches_hinton_formula_with_and_without_t2():
    s, t, y = _logits()
    temperature, alpha = 3.0, 0.7
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    student, teacher = _pair()
    distiller = ClassifierDistiller(
        student, teacher, method_entries("kd", alpha=alpha, temperature=temperature)
    )
    batch = _batch()
    distiller.eval()
    losses = distiller(batch)
    s, t, y = student(batch["inputs"]), teacher(batch["inputs"]), batch["labels"]
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    assert torch.allclose(losses["kd"], alpha * temperature**2 * kl, rtol=1e-5)
    assert torch.allclose(losses["ce"], (1 - alpha) * F.cross_entropy(s, y))
    unscaled = _terms("kd", Outputs(s, y, t), temperature=temperature, t2_scaling=False)
    assert torch.allclose(unscaled["kd"], kl, rtol=1e-5)


def test_kd_is_zero_when_student_equals_teacher():
    s, _, y = _logits()
    terms = _terms("kd", Outputs(s, y, s.clone()))
    assert set(terms) == {"kd"} and float(terms["kd"]) == pytest.approx(0.0, abs=1e-6)


def test_dkd_parts_follow_the_decoupled_formula():
    s, t, y = _logits(seed=3)
    T = 2.0
    terms = _terms("dkd", Outputs(s, y, t), alpha=1.0, beta=1.0, temperature=T)
    assert set(terms) == {"dkd_target", "dkd_nontarget"}
    p_s, p_t = F.softmax(s / T, -1), F.softmax(t / T, -1)
    mask = F.one_hot(y, s.shape[1]).bool()
    b_s = torch.stack([p_s[mask], p_s[~mask].view(len(y), -1).sum(-1)], -1)
    b_t = torch.stack([p_t[mask], p_t[~mask].view(len(y), -1).sum(-1)], -1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1).mean() * T**2
    q_s = F.log_softmax(s[~mask].view(len(y), -1) / T, -1)
    q_t = F.log_softmax(t[~mask].view(len(y), -1) / T, -1)
    nckd = (q_t.exp() * (q_t - q_s)).sum(-1).mean() * T**2
    assert torch.allclose(terms["dkd_target"], tckd, rtol=1e-4)
    assert torch.allclose(terms["dkd_nontarget"], nckd, rtol=1e-4)
    weighted = _terms("dkd", Outputs(s, y, t), alpha=0.5, beta=4.0, temperature=T)
    assert torch.allclose(weighted["dkd_nontarget"], 4.0 * nckd, rtol=1e-4)


def test_dkd_warmup_ramps_with_optimizer_steps():
    # defect: the ramp counted forward calls (micro-batches), not optimizer steps
    s, t, y = _logits()
    term = build_objective({"name": "dkd", "warmup_steps": 4}).train()
    with pytest.raises(RuntimeError, match="on_step"):
        term.terms(Outputs(s, y, t))  # training without the engine's step would ramp wrongly
    first = term.terms(Outputs(s, y, t, step=0))["dkd_nontarget"]
    again = term.terms(Outputs(s, y, t, step=0))["dkd_nontarget"]  # another micro-batch of step 0
    third = term.terms(Outputs(s, y, t, step=2))["dkd_nontarget"]
    done = term.terms(Outputs(s, y, t, step=10))["dkd_nontarget"]
    assert (
        torch.allclose(again, first) and torch.allclose(third, 3 * first) and torch.allclose(done, 4 * first)
    )
    assert term.state_dict() == {}  # no call counter to checkpoint: the engine's step is restored


def test_dist_is_zero_for_identical_predictions_and_positive_otherwise():
    s, t, y = _logits(b=8)
    same = _terms("dist", Outputs(s, y, s.clone()))
    assert float(same["dist_inter"]) == pytest.approx(0, abs=1e-5)
    assert float(same["dist_intra"]) == pytest.approx(0, abs=1e-5)
    different = _terms("dist", Outputs(s, y, t))
    assert float(different["dist_inter"]) > 0.01 and float(different["dist_intra"]) > 0.01


def test_feature_hooks_capture_the_named_module_output():
    model = build_vision_model("cnn", {"width": 4, "stages": 2})
    x = torch.randn(3, 1, 28, 28)
    with FeatureHooks(model, ["stage1", "stage2"]) as hooks:
        model(x)
        assert hooks.get("stage1").shape == (3, 4, 14, 14)
        assert torch.allclose(hooks.get("stage2"), model.stage2(model.stage1(x)))
    assert not model.stage1._forward_hooks  # removed on exit


def test_feature_hooks_wrong_name_lists_available_modules():
    model = build_vision_model("cnn", {"width": 4, "stages": 2})
    with pytest.raises(KeyError, match=r"no module named 'stage3'.*available: stage1, stage1\.0"):
        FeatureHooks(model, ["stage3"])


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return build_vision_model("cnn", {"width": 4, "stages": 2}), build_vision_model(
        "cnn", {"width": 8, "stages": 2}
    )


def _batch(b: int = 8) -> dict[str, torch.Tensor]:
    return {"inputs": torch.randn(b, 1, 28, 28), "labels": torch.randint(0, 10, (b,))}


def test_fitnet_trains_its_projector_and_never_the_teacher():
    student, teacher = _pair()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = ClassifierDistiller(
        student,
        teacher,
        [{"name": "ce"}, {"name": "fitnet", "weight": 2.0}],
        example_inputs=_batch()["inputs"],
    )
    projector = distiller.terms[1].projector
    assert (
        isinstance(projector[0], nn.Conv2d)
        and projector[0].in_channels == 8
        and projector[0].out_channels == 16
    )
    names = {n for n, _ in distiller.named_parameters()}
    assert any(n.startswith("terms.1.projector") for n in names)
    assert not any("teacher" in n for n in names)
    projector_before = projector[0].weight.clone()
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)
    distiller.train()
    losses = distiller(_batch())
    assert set(losses) == {"ce", "fitnet"} and float(losses["fitnet"].detach()) > 0
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(projector[0].weight, projector_before)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())  # incl. BN stats
    assert not teacher.training


def test_distiller_weights_terms_and_suffixes_repeated_names():
    student, teacher = _pair()
    batch = _batch()
    plain = ClassifierDistiller(student, teacher, [{"name": "kd"}])
    doubled = ClassifierDistiller(student, teacher, [{"name": "kd", "weight": 2.0}, {"name": "ce"}])
    plain.eval(), doubled.eval()
    a, b = plain(batch), doubled(batch)
    assert torch.allclose(b["kd"], 2 * a["kd"])
    twice = ClassifierDistiller(student, teacher, [{"name": "ce"}, {"name": "ce", "weight": 0.5}]).eval()(
        batch
    )
    assert set(twice) == {"ce", "ce_2"} and torch.allclose(twice["ce_2"], 0.5 * twice["ce"])


def test_attention_transfer_on_two_layer_pairs():
    student, teacher = _pair()
    distiller = ClassifierDistiller(
        student, teacher, [{"name": "at"}], example_inputs=torch.randn(2, 1, 28, 28)
    )
    losses = distiller(_batch())
    assert set(losses) == {"at"} and float(losses["at"].detach()) > 0 and losses["at"].requires_grad
    same = ClassifierDistiller(
        teacher, teacher, [{"name": "at"}], example_inputs=torch.randn(2, 1, 28, 28)
    ).eval()
    assert float(same(_batch())["at"]) == pytest.approx(0, abs=1e-6)


def test_a_teacherless_objective_needs_no_teacher_but_kd_does():
    student, _ = _pair()
    losses = ClassifierDistiller(student, None, [{"name": "ce"}])(_batch())
    assert set(losses) == {"ce"}
    with pytest.raises(ValueError, match="'kd' needs a teacher"):
        ClassifierDistiller(student, None, [{"name": "kd"}])


def test_feature_objective_with_a_wrong_layer_name_lists_modules():
    student, teacher = _pair()
    with pytest.raises(KeyError, match="available: stage1"):
        ClassifierDistiller(
            student, teacher, [{"name": "fitnet", "student_layer": "layer9"}], _batch()["inputs"]
        )


def test_objective_spec_validation_locates_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as error:
        ObjectiveSpec.model_validate({"name": "kdd"})
    assert error.value.errors()[0]["loc"] == ("name",)
    assert "is not an objective (known: " in str(error.value) and " kd" in str(error.value)
    with pytest.raises(ValidationError, match="'temprature' is not a parameter here"):
        ObjectiveSpec.model_validate({"name": "kd", "temprature": 2})
    with pytest.raises(ValidationError, match="beta=1.5 is outside"):
        ObjectiveSpec.model_validate({"name": "kd", "divergence": "jsd", "beta": 1.5})
    with pytest.raises(ValidationError) as error:
        ObjectiveSpec.model_validate({"name": "kd", "temperature": "hot"})
    assert error.value.errors()[0]["loc"] == ("temperature",)


def test_method_entries_are_updated_and_extended_by_objectives():
    student = ClassifierStudentRun(
        name="s", method="kd", temperature=2.0, objectives=[{"name": "ce", "weight": 0.1}, {"name": "dist"}]
    )
    entries = [spec.model_dump() for spec in student.resolved_objectives()]
    assert [(e["name"], e["weight"]) for e in entries] == [("ce", 0.1), ("kd", 0.9), ("dist", 1.0)]
    assert entries[1]["temperature"] == 2.0
    assert math.isclose(method_entries("dkd")[1]["beta"], 8.0)
