"""Rewards instead of labels: off-policy KD, on-policy GKD, REINFORCE with log p_T, GRPO with the task's
checker and GRPO with a judge's verdict, at equal student sampling budget, on arithmetic and planning.

Every variant starts from the same label-free student (the cached teacher with its MLPs pruned to a
quarter width, all layers kept) and trains for the same number of optimizer steps on the same
number of sequences per step (32): dataset completions (off-policy KD) or the student's own samples
(32 prompts × 1 for GKD λ=1 and REINFORCE; 8 prompts × G=4 for GRPO). Only "offpolicy_kd" reads the
dataset's expert completions and only "grpo_task" reads the task's answers (through its checker);
the judge-reward student sees neither: its reward is a judge LM's p("Y") after the template
"{prompt}{completion}?", the judge trained from scratch on labelled worked solutions
(`kdkit.tasks.arithmetic_judge`). The judge's agreement with the checker on the student's own
samples is measured on the side (never fed to training).

    .venv/bin/python benchmarks/rewards.py                     # both tasks, 3 seeds
    .venv/bin/python benchmarks/rewards.py --task planning --seeds 0 1 2
    .venv/bin/python benchmarks/rewards.py --quick             # smoke run
    .venv/bin/python benchmarks/rewards.py --render docs/benchmarks/rewards.json

Writes docs/benchmarks/rewards[_quick].json (each task's part is merged into an existing file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
VARIANTS = ("offpolicy_kd", "gkd_onpolicy", "reinforce_logpT", "grpo_task", "grpo_judge")


class AuditedReward:
    """Wraps a reward; also runs the task's checker on the same samples to measure agreement.

    Only the wrapped reward's values reach training; the checker's verdicts are kept for the audit.
    """

    def __init__(self, reward: Any, checker: Any) -> None:
        self.reward, self.checker = reward, checker
        self.agree = self.total = 0
        self.checker_sum = 0.0
        self.pairs: list[tuple[float, float]] = []  # (reward, checker verdict) of every sample

    def __call__(self, inputs: Any) -> torch.Tensor:
        values = self.reward(inputs)
        truth = self.checker(inputs)
        if values is not truth:
            self.agree += int(((values > 0.5).float() == truth).sum())
        else:
            self.agree += len(truth)
        self.total += len(truth)
        self.checker_sum += float(truth.sum())
        self.pairs += list(zip(values.tolist(), truth.tolist()))
        return values

    def summary(self) -> dict[str, float]:
        n = max(self.total, 1)
        right = [r for r, t in self.pairs if t > 0.5]
        wrong = [r for r, t in self.pairs if t <= 0.5]
        out = {"judge_checker_agreement": self.agree / n, "train_success": self.checker_sum / n}
        if right and wrong:  # how well the reward ranks right above wrong samples (0.5 = chance)
            above = sum((a > b) + 0.5 * (a == b) for a in right for b in wrong)
            out |= {
                "reward_auc": above / (len(right) * len(wrong)),
                "reward_mean_right": sum(right) / len(right),
                "reward_mean_wrong": sum(wrong) / len(wrong),
            }
        return out


def _history_sum(path: Path, key: str) -> float:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    total, previous = 0.0, 0
    for record in records:
        total += record.get(key, 0.0) * (record["step"] - previous)
        previous = record["step"]
    return total


def task_setup(task: str, quick: bool) -> dict[str, Any]:
    """Teacher, tokenizer, training samples, evaluation function and generation length of a task."""
    from kdkit.samplers.collate import PromptCompletionCollator

    if task == "arithmetic":
        from kdkit.pipelines.teachers import get_arithmetic_teacher
        from kdkit.tasks.arithmetic import arithmetic_dataset, exact_match_by_length
        from kdkit.tasks.arithmetic import make_problems as make

        teacher, tokenizer, folder = get_arithmetic_teacher()
        problems = make(120 if quick else 400, (1, 4), seed=12345)

        def evaluate(model: Any) -> dict[str, float]:
            scores = exact_match_by_length(model, tokenizer, problems, batch_size=128)
            return {f"em_{d}": v for d, v in scores.items()}

        def train_samples(seed: int) -> list[dict[str, Any]]:
            return arithmetic_dataset(4000, (1, 3), seed=seed)

        student_shape = (3, 48)  # all 3 layers, MLP 192 -> 48: 49% on 1-digit, ~0% beyond
        max_new_tokens = 40  # a 4-digit solution is 42 characters: the student trains on 1-3 digits (32)
    else:
        from kdkit.pipelines.planning_teacher import get_planning_teacher
        from kdkit.tasks.planning import (
            DIFFICULTIES,
            make_scenarios,
            plan_metrics,
            planning_dataset,
        )

        teacher, tokenizer, folder = get_planning_teacher()
        scenarios = make_scenarios(80 if quick else 400, tuple(DIFFICULTIES), seed=12345)

        def evaluate(model: Any) -> dict[str, float]:
            rows = plan_metrics(model, tokenizer, scenarios)
            return {f"{k}_{d}": v for d, row in rows.items() for k, v in row.items()}

        def train_samples(seed: int) -> list[dict[str, Any]]:
            return planning_dataset(4000, seed=seed + 1000)

        student_shape = (2, 48)  # 2 of 3 layers, MLP 48 (the MLP cut alone barely hurts this teacher)
        max_new_tokens = 24
    collate = PromptCompletionCollator(tokenizer)
    return {
        "teacher": teacher,
        "tokenizer": tokenizer,
        "folder": folder,
        "evaluate": evaluate,
        "train_samples": train_samples,
        "collate": collate,
        "max_new_tokens": max_new_tokens,
        "student_shape": student_shape,
    }


def build_variant(
    name: str, task: str, student: Any, setup: dict[str, Any], judge: Any
) -> tuple[Any, int, Any]:
    """(distiller, prompts per step, audit or None) of one variant."""
    from kdkit.methods.lm_distiller import LMDistiller
    from kdkit.methods.policy_gradient import PolicyGradientDistiller
    from kdkit.objectives.lm import DivergenceObjective, DivergenceParams
    from kdkit.rewards import CheckerReward, JudgeReward
    from kdkit.samplers import DatasetSampler, GenerationSettings, StudentSampler

    teacher, tokenizer = setup["teacher"], setup["tokenizer"]
    generation = GenerationSettings(
        temperature=1.0,
        max_new_tokens=setup["max_new_tokens"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if name == "offpolicy_kd":
        fkl = DivergenceObjective(DivergenceParams(divergence="fkl"))
        return LMDistiller(student, teacher, sampler=DatasetSampler(), objective=fkl), 32, None
    if name == "gkd_onpolicy":  # GKD with λ = 1: the student's own samples only, JSD(β=0.5)
        sampler = StudentSampler(**vars(generation))
        jsd = DivergenceObjective(DivergenceParams(divergence="jsd", beta=0.5))
        distiller = LMDistiller(student, teacher, sampler=sampler, objective=jsd)
        return distiller, 32, None
    if name == "reinforce_logpT":
        distiller = PolicyGradientDistiller(
            student, teacher, estimator="reinforce", group_size=1, tokenizer=tokenizer, generation=generation
        )
        return distiller, 32, None
    checker = CheckerReward(task)
    if name == "grpo_task":
        reward = AuditedReward(checker, checker)
    elif name == "grpo_judge":
        judge_model, judge_tokenizer = judge
        judge_reward = JudgeReward(
            judge_model, judge_tokenizer, template="{prompt}{completion}?", yes="Y", no="N", output="prob"
        )
        reward = AuditedReward(judge_reward, checker)
    else:
        raise ValueError(name)
    distiller = PolicyGradientDistiller(
        student, teacher, reward=reward, tokenizer=tokenizer, group_size=4, generation=generation
    )
    return distiller, 8, reward


def warm_start(
    student: Any, setup: dict[str, Any], samples: list, seed: int, steps: int, run_dir: Path
) -> Any:
    """`steps` steps of forward KL on the teacher's greedy completions (no dataset labels)."""
    from kdkit.config import TrainConfig
    from kdkit.engine import train
    from kdkit.methods.lm_distiller import LMDistiller
    from kdkit.objectives.lm import DivergenceObjective, DivergenceParams
    from kdkit.samplers import GenerationSettings, TeacherSampler

    tokenizer = setup["tokenizer"]
    greedy = GenerationSettings(
        temperature=0.0,
        max_new_tokens=setup["max_new_tokens"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fkl = DivergenceObjective(DivergenceParams(divergence="fkl"))
    distiller = LMDistiller(student, setup["teacher"], sampler=TeacherSampler(**vars(greedy)), objective=fkl)
    cfg = TrainConfig(
        steps=steps,
        batch_size=32,
        lr=1e-3,
        warmup_steps=2,
        schedule="constant",
        weight_decay=0.0,
        seed=1000 + seed,
        log_every=steps,
        checkpoint_every=steps,
        mixed_precision="no",
        progress=False,
    )
    train(distiller, samples, cfg, run_dir, collate_fn=setup["collate"])
    return distiller.student


def run_task(
    task: str,
    seeds: list[int],
    steps: int,
    quick: bool,
    work: Path,
    only: list[str] | None = None,
    warm_steps: int = 3,
    lr: float = 5e-4,
) -> dict[str, Any]:
    from kdkit.config import TrainConfig
    from kdkit.engine import train
    from kdkit.models.lm import derive_student

    setup = task_setup(task, quick)
    teacher, evaluate = setup["teacher"], setup["evaluate"]
    judge = None
    variants = [v for v in VARIANTS if only is None or v in only]
    if task == "planning" and "grpo_judge" in variants:
        variants.remove("grpo_judge")  # no judge for planning: the task reward only
    judge_info: dict[str, Any] = {}
    if "grpo_judge" in variants:
        from kdkit.pipelines.judges import get_arithmetic_judge
        from kdkit.tasks.arithmetic_judge import ArithmeticJudgeConfig

        # --quick: a barely trained judge (its own cache entry), to exercise the code path only
        judge_cfg = ArithmeticJudgeConfig(steps=20) if quick else ArithmeticJudgeConfig()
        judge_model, judge_tokenizer, judge_folder = get_arithmetic_judge(judge_cfg, progress=False)
        judge = (judge_model, judge_tokenizer)
        judge_info = json.loads((judge_folder / "kdkit_judge.json").read_text())

    def pruned_student() -> Any:
        torch.manual_seed(0)
        layers, width = setup["student_shape"]
        return derive_student(teacher, keep_layers=layers, intermediate_size=width).train()

    reference = {"teacher": evaluate(teacher), "student_pruned": evaluate(pruned_student())}
    print(
        f"[{task}] teacher {reference['teacher']}\n[{task}] pruned {reference['student_pruned']}", flush=True
    )
    runs = []
    for seed in seeds:
        samples = setup["train_samples"](seed)
        # label-free warm start shared by every variant of this seed: sequence-level KD on the
        # teacher's greedy completions of the training prompts
        warm = warm_start(pruned_student(), setup, samples, seed, warm_steps, work / f"{task}-warm-{seed}")
        reference[f"student_warm_seed{seed}"] = evaluate(warm.eval())
        print(f"[{task}] warm-started (seed {seed}) {reference[f'student_warm_seed{seed}']}", flush=True)
        warm_state = {k: v.clone() for k, v in warm.state_dict().items()}
        for name in variants:
            student = pruned_student()
            student.load_state_dict(warm_state)
            student.train()
            torch.manual_seed(seed)
            distiller, prompts, audit = build_variant(name, task, student, setup, judge)
            cfg = TrainConfig(
                steps=steps,
                batch_size=prompts,
                lr=lr,
                warmup_steps=max(steps // 10, 1),
                schedule="constant",
                weight_decay=0.0,
                seed=seed,
                log_every=1,
                checkpoint_every=steps,
                mixed_precision="no",
                progress=False,
            )
            result = train(
                distiller, samples, cfg, work / f"{task}-{name}-{seed}", collate_fn=setup["collate"]
            )
            scores = evaluate(distiller.student.eval())
            gen_s = _history_sum(result.history_path, "diag/gen_s")
            reward_s = _history_sum(result.history_path, "diag/reward_s")
            run = {
                "task": task,
                "variant": name,
                "seed": seed,
                "wall_s": result.wall_time_s,
                "generation_s": gen_s,
                "reward_s": reward_s,
                "scores": scores,
            }
            if audit is not None:
                run |= audit.summary()
            runs.append(run)
            print(
                f"[{task}] {name:<16} seed {seed}: {result.wall_time_s:6.1f} s (sampling {gen_s:5.1f} s) "
                f"{ {k: round(v, 3) for k, v in scores.items()} }"
                + (f" audit {audit.summary()}" if audit else ""),
                flush=True,
            )
    return {"reference": reference, "runs": runs, "judge": judge_info, "teacher_folder": str(setup["folder"])}


def judge_audit() -> dict[str, Any]:
    """The cached arithmetic judge on labelled solutions: accuracy (from its cache record), ROC AUC
    of p("Y") on 1000 held-out labelled solutions (1-6 digits), and mean p("Y") / share above ½ on
    300 right solutions and on the same problems corrupted each way."""
    import random

    from kdkit.pipelines.judges import get_arithmetic_judge
    from kdkit.rewards import JudgeReward, RewardInputs
    from kdkit.tasks.arithmetic import make_problems
    from kdkit.tasks.arithmetic_judge import CORRUPTIONS, corrupt, judge_samples

    judge, tokenizer, folder = get_arithmetic_judge(progress=False)
    filled = JudgeReward(judge, tokenizer, template="{prompt}{completion}", output="prob")
    samples = judge_samples(1000, (1, 6), seed=20_000)
    p_yes = filled.verdict_log_probs([s["prompt"] for s in samples])[:, filled.yes_id].exp().tolist()
    right = [p for p, s in zip(p_yes, samples) if s["label"]]
    wrong = [p for p, s in zip(p_yes, samples) if not s["label"]]
    auc = sum((a > b) + 0.5 * (a == b) for a in right for b in wrong) / (len(right) * len(wrong))
    reward = JudgeReward(judge, tokenizer, output="prob")
    problems = make_problems(300, (1, 4), seed=77)
    prompts = [q.prompt for q in problems]
    rng = random.Random(1)
    kinds: dict[str, Any] = {}
    for kind in ("right", *CORRUPTIONS):
        texts = [q.completion if kind == "right" else corrupt(q, kind, rng) for q in problems]
        values = reward(RewardInputs(prompts, texts))
        kinds[kind] = {
            "mean_p_yes": float(values.mean()),
            "share_above_half": float((values > 0.5).float().mean()),
        }
    info = json.loads((folder / "kdkit_judge.json").read_text())
    return {
        "accuracy": info["accuracy"],
        "train_seconds": info["train_seconds"],
        "heldout_auc": auc,
        "by_kind": kinds,
    }


# ----------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}%"
    return f"{100 * statistics.mean(values):.1f}% ± {100 * statistics.pstdev(values):.1f}"


def _table(part: dict[str, Any], keys: list[str], labels: list[str], extra: bool) -> list[str]:
    """One Markdown table: reference rows, then one row per variant (mean ± population std)."""
    runs = part["runs"]
    header = ["variant", *labels] + (
        ["wall s", "sampling share", "train success", "reward AUC"] if extra else []
    )
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    warm_refs = [k for k in part["reference"] if k.startswith("student_warm")]
    dash = ["—"] * (4 if extra else 0)
    for ref in ("teacher", "student_pruned", "student_warm"):
        if ref == "student_warm":
            if not warm_refs:
                continue
            row = {k: statistics.mean(part["reference"][w][k] for w in warm_refs) for k in keys}
            ref = f"warm start (mean of {len(warm_refs)} seeds)"
        else:
            row = part["reference"][ref]
        lines.append("| " + " | ".join([ref, *(f"{100 * row[k]:.1f}%" for k in keys), *dash]) + " |")
    for variant in VARIANTS:
        chosen = [r for r in runs if r["variant"] == variant]
        if not chosen:
            continue
        cells = [f"{variant} (n={len(chosen)})"]
        cells += [_mean_std([r["scores"][k] for r in chosen]) for k in keys]
        if extra:
            wall = [r["wall_s"] for r in chosen]
            cells.append(f"{statistics.mean(wall):.0f} ± {statistics.pstdev(wall):.0f}")
            share = [r["generation_s"] / r["wall_s"] for r in chosen]
            cells.append(f"{100 * statistics.mean(share):.0f}%")
            success = [r["train_success"] for r in chosen if "train_success" in r]
            cells.append(_mean_std(success) if success else "—")
            auc = [r["reward_auc"] for r in chosen if "reward_auc" in r and variant == "grpo_judge"]
            cells.append(f"{statistics.mean(auc):.2f}" if auc else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_tables(result: dict[str, Any]) -> str:
    lines: list[str] = []
    for task, part in result.get("tasks", {}).items():
        keys = list(part["reference"]["teacher"])
        lines.append(f"### {task}\n")
        if task == "arithmetic":
            labels = [f"EM {k.removeprefix('em_')}-digit" for k in keys]
            lines += _table(part, keys, labels, extra=True)
        else:
            levels = [k.removeprefix("success_") for k in keys if k.startswith("success_")]
            lines.append("Success rate by difficulty:\n")
            lines += _table(part, [f"success_{d}" for d in levels], levels, extra=True)
            lines.append("\nCollision / off-grid rate by difficulty:\n")
            pairs = [
                (f"{m}_{d}", f"{m.replace('_', '-')} {d}") for d in levels for m in ("collision", "off_grid")
            ]
            lines += _table(part, [k for k, _ in pairs], [label for _, label in pairs], extra=False)
        lines.append("")
    audit = result.get("judge_audit")
    if audit:
        lines.append("### the arithmetic judge\n")
        lines.append(
            f"Held-out accuracy {100 * audit['accuracy']['all']:.1f}% (right solutions "
            f"{100 * audit['accuracy']['correct']:.1f}%, "
            f"wrong ones {100 * audit['accuracy']['incorrect']:.1f}%), "
            f"ROC AUC of p(Y) {audit['heldout_auc']:.2f}, trained in {audit['train_seconds']:.0f} s.\n"
        )
        lines.append("| solutions | mean p(Y) | share with p(Y) > ½ |")
        lines.append("|---|---:|---:|")
        for kind, row in audit["by_kind"].items():
            lines.append(f"| {kind} | {row['mean_p_yes']:.3f} | {100 * row['share_above_half']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("arithmetic", "planning", "both"), default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warm-steps", type=int, default=3, help="label-free SeqKD warm start (shared)")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW lr of every variant (constant)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        help="run only these; their runs replace the same ones in the JSON",
    )
    parser.add_argument("--render", type=Path)
    parser.add_argument(
        "--judge-audit", action="store_true", help="audit the cached judge; store it in the JSON"
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        print(render_tables(json.loads(args.render.read_text())))
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    if args.judge_audit:
        audit = judge_audit()
        path = OUT / "rewards.json"
        result = json.loads(path.read_text()) if path.is_file() else {"tasks": {}}
        result["judge_audit"] = audit
        path.write_text(json.dumps(result, indent=2))
        print(json.dumps(audit, indent=2))
        return 0
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (4 if args.quick else 100)
    path = OUT / ("rewards_quick.json" if args.quick else "rewards.json")
    tasks = ["arithmetic", "planning"] if args.task == "both" else [args.task]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdkit-rewards-") as tmp:
        for task in tasks:
            part = run_task(
                task, seeds, steps, args.quick, Path(tmp), args.variants, args.warm_steps, args.lr
            )
            command = "benchmarks/rewards.py " + " ".join(argv if argv is not None else sys.argv[1:])
            machine = {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "load_average": list(os.getloadavg()),
                "elapsed_s": time.perf_counter() - started,
            }
            # read the file only now: runs of other tasks or variants may have finished meanwhile
            result: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"tasks": {}}
            old = result["tasks"].get(task)
            if old is not None and args.variants:  # merge: keep the other variants' runs
                new_keys = {(r["variant"], r["seed"]) for r in part["runs"]}
                part["runs"] = [r for r in old["runs"] if (r["variant"], r["seed"]) not in new_keys] + part[
                    "runs"
                ]
                part["judge"] = part["judge"] or old.get("judge", {})
                part["commands"] = [*old.get("commands", []), command]
                part["machines"] = [*old.get("machines", []), machine]
            else:
                part["commands"], part["machines"] = [command], [machine]
            part |= {
                "seeds": seeds,
                "steps": steps,
                "warm_steps": args.warm_steps,
                "lr": args.lr,
                "sequences_per_step": 32,
            }
            result["tasks"][task] = part
            path.write_text(json.dumps(result, indent=2))
    print(render_tables(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
