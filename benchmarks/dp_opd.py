"""DP-OPD vs DP fine-tuning vs off-policy DP-KD on the arithmetic task, with a privacy audit.

Setting (all on CPU, tiny models; see docs/benchmarks/dp_opd.md for the figures):

- public teacher: kdkit's cached arithmetic teacher (3-layer Llama, width 64, trained on generated
  1–4 digit additions; `kdkit.tasks.arithmetic.get_arithmetic_teacher`);
- private records: `--records` fresh additions plus `--canaries` canary records "|dddd|" + a random
  secret of `--secret-length` digits, each inserted `--copies` times;
- private teacher: the public teacher fine-tuned *non-privately* on the private records (the case
  ε does not cover; it memorises canaries), frozen afterwards;
- student: the private teacher's first layer only (layer selection, weights copied), trained with
  `kdkit.engine.private.train_private` for `--steps` steps at expected batch `--batch-size`:
  dp_opd (student rollouts from each record's prompt, teacher-scored, JSD β=0.5 on them),
  dp_kd (teacher distributions on the record's own tokens), dp_ft (cross-entropy, no teacher);
  at each ε of `--epsilons` (σ derived by the accountant, δ = 1/N) and without privacy
  (same loop, σ = 0 and no clipping: ε = ∞);
- held-out perplexity of completion tokens on fresh problems; audit of every model: canary
  exposure (rank among all secrets) and membership AUC (private records vs fresh problems).

Run: nice -n 10 python benchmarks/dp_opd.py --out docs/benchmarks/dp_opd.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kdkit.engine.private import PrivacyConfig, train_private
from kdkit.engine.settings import TrainConfig
from kdkit.methods.private_distiller import PrivateLMDistiller
from kdkit.models.lm import derive_student
from kdkit.pipelines.teachers import get_arithmetic_teacher, train_causal_lm
from kdkit.privacy.audit import audit, insert_canaries, make_canaries
from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.samplers.generation import GenerationSettings
from kdkit.tasks.arithmetic import arithmetic_dataset

#: benchmark name -> (PrivateLMDistiller mode, λ): dp_gkd is DP-OPD with GKD's per-example
#: λ = 0.5 mixture of student rollouts and the record's own continuation
METHOD_MODES = {"dp_opd": ("opd", 1.0), "dp_gkd": ("opd", 0.5), "dp_kd": ("kd", 1.0), "dp_ft": ("ft", 1.0)}


def held_out_perplexity(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]]) -> float:
    """exp(mean NLL per completion token, EOS included) over `rows` (token-weighted)."""
    from kdkit.eval.lm import perplexity

    collate = PromptCompletionCollator(tokenizer)
    batches = [collate(rows[i : i + 128]) for i in range(0, len(rows), 128)]
    return float(perplexity(model, batches)["perplexity"])


def private_teacher(public: torch.nn.Module, tokenizer: Any, private: list[dict[str, Any]], steps: int,
                    work: Path) -> torch.nn.Module:
    """The public teacher fine-tuned non-privately on the private records (a copy; then frozen)."""
    import copy

    from kdkit.config.lm import ArithmeticTeacherConfig

    teacher = copy.deepcopy(public).train()
    config = ArithmeticTeacherConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=10, seed=1)
    train_causal_lm(teacher, tokenizer, private, config,
                    work / "teacher_ft", progress=False)
    return teacher.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--canaries", type=int, default=8)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--secret-length", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 2.0, 8.0])
    parser.add_argument("--methods", nargs="+", default=["dp_opd", "dp_kd", "dp_ft"],
                        choices=list(METHOD_MODES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--non-private", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    started = time.perf_counter()
    public, tokenizer, _ = get_arithmetic_teacher()
    def text_only(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]

    records = text_only(arithmetic_dataset(args.records, (1, 4), seed=101))
    canaries = make_canaries(args.canaries, copies=args.copies, secret_length=args.secret_length, seed=7)
    private = insert_canaries(records, canaries, seed=3)
    held_out = text_only(arithmetic_dataset(args.held_out, (1, 4), seed=202))
    non_members = text_only(arithmetic_dataset(args.members, (1, 4), seed=303))
    members = records[: args.members]
    collate = PromptCompletionCollator(tokenizer)
    settings = GenerationSettings(max_new_tokens=48, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict[str, Any] = {"args": arguments, "records": len(private), "runs": []}

    def evaluate(name: str, model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        row = {"model": name, **extra, "perplexity": held_out_perplexity(model, tokenizer, held_out)}
        found = audit(model, tokenizer, canaries, members, non_members)
        row |= {k: v for k, v in found.items() if k != "per_canary"}
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        results["runs"].append(row)
        if args.out:  # after every model, so a cut-short run keeps what it measured
            results["summary"] = summarise(results["runs"])
            args.out.write_text(json.dumps(results, indent=1))
        return row

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        teacher = private_teacher(public, tokenizer, private, args.teacher_steps, work)
        results["teacher_finetune_s"] = round(time.perf_counter() - t0, 1)
        evaluate("public teacher (never saw the private data)", public, method="teacher", epsilon=None)
        evaluate("private teacher (fine-tuned non-privately)", teacher, method="teacher", epsilon=None)
        initial = derive_student(teacher, keep_layers=[0])
        evaluate("student before training (layer 0 of the private teacher)", initial, method="init",
                 epsilon=None)

        settings_list: list[float | None] = ([None] if args.non_private else []) + list(args.epsilons)
        for seed in args.seeds:
            for eps in settings_list:
                for method in args.methods:
                    student = derive_student(teacher, keep_layers=[0])
                    mode, lmbda = METHOD_MODES[method]
                    distiller = PrivateLMDistiller(student, None if mode == "ft" else teacher, mode=mode,
                                                   generation=settings, lmbda=lmbda)
                    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
                                      log_every=max(args.steps // 4, 1), checkpoint_every=args.steps,
                                      progress=False, mixed_precision="no", warmup_steps=0)
                    privacy = (PrivacyConfig(noise_multiplier=0.0, max_grad_norm=1e6) if eps is None else
                               PrivacyConfig(target_epsilon=eps, max_grad_norm=args.clip))
                    run_dir = work / f"{method}_{eps}_{seed}"
                    t0 = time.perf_counter()
                    result = train_private(distiller, private, cfg, privacy, run_dir, collate_fn=collate)
                    train_s = time.perf_counter() - t0
                    evaluate(f"{method} ε={'∞' if eps is None else eps} seed {seed}", student, method=method,
                             epsilon=None if eps is None else result.epsilon, target_epsilon=eps, seed=seed,
                             sigma=result.plan.noise_multiplier, sample_rate=result.plan.sample_rate,
                             delta=result.plan.delta, train_s=round(train_s, 1),
                             mean_batch=round(result.mean_batch_size, 2))

    results["summary"] = summarise(results["runs"])
    results["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results["summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd over seeds of each (method, target ε)."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for run in runs:
        if run["method"] in ("teacher", "init"):
            continue
        groups.setdefault((run["method"], run.get("target_epsilon")), []).append(run)
    table = []
    for (method, eps), rows in groups.items():
        entry: dict[str, Any] = {"method": method, "target_epsilon": eps, "seeds": len(rows)}
        for key in ("perplexity", "exposure_mean", "exposure_max", "mia_auc", "train_s"):
            values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
            entry[key] = statistics.fmean(values) if values else None
            entry[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else None
        table.append(entry)
    return table


if __name__ == "__main__":
    main()
