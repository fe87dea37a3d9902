"""Black-box methods: sequence-level KD on stored text, SODA (snapshot + DPO), Gen-SSD selection."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kdkit.methods.blackbox import CompletionCEDistiller, completion_log_probs, stored_samples
from kdkit.methods.gen_ssd import GenSSDSettings, path_report, select_paths
from kdkit.methods.soda import DPODistiller, PairCollator, SODASettings, run_soda, snapshot_id
from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.teachers import HFTeacher, OpenAITeacher, ResponseStore, SamplingParams, collect
from tests.teachers.server import TinyLMServer, tiny_arithmetic_lm

PAIRS = [
    {"prompt": "12+34=", "chosen": "2+4+0=06|=46", "rejected": "9"},
    {"prompt": "5+5=", "chosen": "5+5+0=10|=10", "rejected": "5+5+0=11|=11"},
]


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_arithmetic_lm(seed=0)


@pytest.fixture
def server(tiny_lm):
    with TinyLMServer(*tiny_lm) as running:
        yield running


def test_pair_collator_puts_chosen_rows_first(tiny_lm) -> None:
    _, tok = tiny_lm
    batch = PairCollator(tok)(PAIRS)
    assert int(batch["pairs"]) == 2 and batch["input_ids"].shape[0] == 4
    for row, text in enumerate([p["chosen"] for p in PAIRS] + [p["rejected"] for p in PAIRS]):
        labels = batch["labels"][row]
        assert tok.decode(labels[labels != -100].tolist()) == text + "<eos>"


def test_dpo_starts_at_log2_and_learns_the_preference(tiny_lm) -> None:
    model, tok = tiny_lm
    student = copy.deepcopy(model).train()
    distiller = DPODistiller(student, copy.deepcopy(model), beta=0.5, nll_weight=1.0)
    batch = PairCollator(tok)(PAIRS)
    with torch.no_grad():
        terms = distiller(batch)
    assert float(terms["dpo"]) == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    with torch.no_grad():
        logps, mask = completion_log_probs(model, {k: v[:2] for k, v in batch.items() if k != "pairs"})
    assert float(terms["nll"]) == pytest.approx(float(-logps.sum() / mask.sum()), rel=1e-5)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(15):
        terms = distiller(batch)
        optimizer.zero_grad()
        (terms["dpo"] + terms["nll"]).backward()
        optimizer.step()
    with torch.no_grad():
        final = distiller(batch)
    assert float(final["dpo"]) < 0.5 and float(final["_reward_accuracy"]) == 1.0


def test_completion_ce_is_the_mean_over_completion_tokens(tiny_lm) -> None:
    model, tok = tiny_lm
    samples = [{"prompt": "1+1=", "completion": "1+1+0=02|=2"}, {"prompt": "9+9=", "completion": "9"}]
    batch = PromptCompletionCollator(tok)(samples)
    terms = CompletionCEDistiller(model)(batch)
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100
    )
    assert float(terms["ce"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["_tokens"]) == 11 + 1 + 1 + 1  # both completions with EOS


def test_soda_snapshots_the_base_student_once_and_resumes_from_the_store(tiny_lm, tmp_path) -> None:
    teacher_model, tok = tiny_lm
    student, _ = tiny_arithmetic_lm(seed=1)
    base = copy.deepcopy(student)
    teacher = HFTeacher(teacher_model, tok, teacher_id="teacher")
    prompts = [f"{i}+{i}=" for i in range(8)]
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    settings = SODASettings(warmup_steps=3, dpo_steps=3, batch_size=4, student_params=greedy)
    with ResponseStore(tmp_path / "r.sqlite") as store:
        sampled = SamplingParams(temperature=1.0, max_tokens=6, seed=0)
        summary = run_soda(
            student, tok, teacher, store, prompts, sampled, tmp_path / "run", settings=settings
        )
        assert summary["teacher_collection"]["stored"] == 8 and summary["snapshot_collection"]["stored"] == 8
        snapshot = [g[0].text for g in store.get(snapshot_id("student"), prompts, greedy)]
        expected = [g[0].text for g in HFTeacher(base, tok).generate(prompts, greedy)]
        assert snapshot == expected  # taken from the base student, before the warm-up
        assert not all(torch.equal(p, b) for p, b in zip(student.parameters(), base.parameters()))  # trained
        assert summary["pairs"] + summary["identical_pairs_dropped"] == 8
        again = run_soda(student, tok, teacher, store, prompts, sampled, tmp_path / "run", settings=settings)
        assert (
            again["teacher_collection"]["requested"] == 0 and again["snapshot_collection"]["requested"] == 0
        )


def test_gen_ssd_keeps_the_lowest_perplexity_candidate_and_prunes_above_threshold(
    tiny_lm, server, tmp_path
) -> None:
    _, tok = tiny_lm
    student, _ = tiny_arithmetic_lm(seed=2)
    teacher = OpenAITeacher(server.url, "tiny")
    prompts = [f"{i}+{2 * i}=" for i in range(5)]
    loose = GenSSDSettings(k=3, chunk_tokens=4, threshold=1e9, max_chunks=3)
    with ResponseStore(tmp_path / "r.sqlite") as store:
        paths = select_paths(teacher, student, tok, store, prompts, loose)
        assert all(p.status in ("finished", "unfinished") for p in paths)
        for path in paths:
            assert len(path.selected_ppl) == path.chunks and len(path.unselected_ppl) == 2 * path.chunks
        report = path_report(paths, tok)
        assert report["student_ppl_selected"] <= report["student_ppl_unselected"]
        requests = len(server.events)
        assert requests == sum(p.chunks for p in paths)  # one request (k samples) per chunk
        # Proposals come from the store: the same selection again costs no teacher call.
        again = select_paths(teacher, student, tok, store, prompts, loose)
        assert [p.text for p in again] == [p.text for p in paths] and len(server.events) == requests
        strict = GenSSDSettings(k=3, chunk_tokens=4, threshold=1.0001, max_chunks=3)
        pruned = select_paths(teacher, student, tok, store, prompts, strict)
        assert all(p.status == "pruned" and p.text == "" for p in pruned)  # a random student is unsure
        rejecting = select_paths(teacher, student, tok, store, prompts, loose, checker=lambda p, t: False)
        assert all(p.status in ("wrong", "unfinished") for p in rejecting)


def test_stored_samples_name_the_missing_prompt(tmp_path, tiny_lm) -> None:
    teacher = HFTeacher(*tiny_lm, teacher_id="t")
    params = SamplingParams(max_tokens=3)
    with ResponseStore(tmp_path / "r.sqlite") as store:
        collect(teacher, store, ["1+1="], params, progress=False)
        assert stored_samples(store, "t", ["1+1="], params)[0]["prompt"] == "1+1="
        with pytest.raises(KeyError, match="2\\+2="):
            stored_samples(store, "t", ["1+1=", "2+2="], params)


def test_on_policy_baseline_resamples_the_rejected_rows_every_step(tiny_lm) -> None:
    from kdkit.samplers.generation import GenerationSettings

    model, tok = tiny_lm
    settings = GenerationSettings(temperature=1.0, max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    distiller = DPODistiller(copy.deepcopy(model), copy.deepcopy(model), resample=settings)
    batch = PairCollator(tok)(PAIRS)
    fresh, seconds = distiller._resampled(batch, 2)
    assert seconds > 0 and int(fresh["pairs"]) == 2
    assert torch.equal(
        fresh["labels"][:2][fresh["labels"][:2] != -100], batch["labels"][:2][batch["labels"][:2] != -100]
    )
    rejected = [tok.decode(r[r != -100].tolist()) for r in fresh["labels"][2:]]
    assert rejected != [p["rejected"] + "<eos>" for p in PAIRS]  # the student's own samples now
    with torch.no_grad():
        terms = distiller(batch)
    assert float(terms["_gen_s"]) > 0 and float(terms["dpo"]) == pytest.approx(math.log(2), abs=1e-5)


def test_gen_ssd_run_stays_near_its_request_budget_and_reports_paths(tiny_lm, server, tmp_path) -> None:
    from kdkit.methods.gen_ssd import run_gen_ssd

    _, tok = tiny_lm
    student, _ = tiny_arithmetic_lm(seed=3)
    settings = GenSSDSettings(
        k=2,
        chunk_tokens=4,
        threshold=1e9,
        max_chunks=2,
        cold_start_prompts=4,
        cold_start_steps=2,
        finetune_steps=2,
        batch_size=4,
        max_requests=12,
    )
    prompts = [f"{i}+{i + 3}=" for i in range(40)]
    with ResponseStore(tmp_path / "r.sqlite") as store:
        summary = run_gen_ssd(
            student,
            tok,
            OpenAITeacher(server.url, "tiny"),
            store,
            prompts,
            SamplingParams(max_tokens=6),
            tmp_path / "run",
            settings=settings,
        )
    assert summary["teacher_requests"] == len(server.events)
    assert 12 <= len(server.events) <= 12 + settings.max_chunks  # cold start 4 + selection, small overshoot
    selection = summary["selection"]
    assert selection["paths"] < 36 and selection["finished"] + selection["unfinished"] == selection["paths"]
    assert selection["teacher_full_mean_tokens"] > 0


def test_dpo_objective_in_the_core_distiller_matches_the_soda_distiller(tiny_lm) -> None:
    from kdkit.methods import LMDistiller
    from kdkit.objectives.lm import DPOObjective
    from kdkit.signals import TokenLogprobsSignal

    model, tok = tiny_lm
    student, reference = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():  # make the policy differ from the reference
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    batch = PairCollator(tok)(PAIRS)
    params = DPOObjective.Params(beta=0.3, nll_weight=0.5)
    core = LMDistiller(student, reference, signal=TokenLogprobsSignal(), objective=DPOObjective(params))
    own = DPODistiller(student, reference, beta=0.3, nll_weight=0.5)
    with torch.no_grad():
        core_terms, own_terms = core(dict(batch)), own(dict(batch))
    assert float(core_terms["kd"]) == pytest.approx(float(own_terms["dpo"] + own_terms["nll"]), rel=1e-5)
    assert float(core_terms["_dpo"]) == pytest.approx(float(own_terms["dpo"]), rel=1e-5)
    with_ce = LMDistiller(
        student, reference, signal=TokenLogprobsSignal(), objective=DPOObjective(params), ce_weight=1.0
    )
    with pytest.raises(ValueError, match="rejected rows"):
        with_ce(dict(batch))
    with pytest.raises(ValueError, match="PairCollator"):
        core(PromptCompletionCollator(tok)([{"prompt": "1+1=", "completion": "2"}]))


def test_text_methods_are_registered_with_checked_parameters(tiny_lm, tmp_path) -> None:
    from pydantic import ValidationError

    from kdkit.registry import METHODS, load_builtins

    load_builtins()
    for name in ("text_seqkd", "soda", "gen_ssd"):
        assert METHODS.get(name).kind == "text"
    with pytest.raises(ValidationError, match="threshold"):
        METHODS.get("gen_ssd").Params(threshold=0.5)
    model, tok = tiny_lm
    method = METHODS.get("text_seqkd")
    params = method.Params(steps=2, batch_size=2, teacher_max_tokens=4)
    with ResponseStore(tmp_path / "r.sqlite") as store:
        summary = method.run(
            params,
            student=copy.deepcopy(model),
            tokenizer=tok,
            teacher=HFTeacher(model, tok, teacher_id="t"),
            store=store,
            prompts=["1+1=", "2+2=", "3+3="],
            run_dir=tmp_path / "run",
        )
    assert summary["samples"] == 3 and summary["collection"]["stored"] == 3
