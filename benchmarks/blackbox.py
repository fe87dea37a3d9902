"""Black-box distillation on arithmetic: seqkd, SODA and Gen-SSD at equal teacher calls, over HTTP.

The cached arithmetic teacher is served by the project's own OpenAI-compatible test server
(tests/teachers/server.py) on 127.0.0.1; the methods see it only as text through `OpenAITeacher`,
and every response goes through a durable `ResponseStore`. The student is derived from the
teacher (all 3 layers, MLPs 192 -> 48 units by weight norm), as in benchmarks/lm_policies.py.

Per seed (the seed draws the training problems, data order and sampling):

- seqkd: `budget` teacher requests (one response per prompt), fine-tuning on them;
- SODA: the same responses (SODA's warm-up *is* that seqkd fine-tune, so seqkd is evaluated at the
  end of SODA's warm-up), a frozen snapshot of the base student, then DPO;
- the on-policy baseline: the same DPO from the same warmed-up student, but the rejected response is
  sampled from the current student at every step (wall time and teacher calls against SODA's);
- Gen-SSD: `cold_start` full teacher responses for the cold start, then chunk-by-chunk selection
  (k candidates per request) until the same `budget` requests are spent; fine-tune on the selected
  paths (answer-checked) plus the cold-start responses.

    .venv/bin/python benchmarks/blackbox.py                 # 3 seeds
    .venv/bin/python benchmarks/blackbox.py --quick         # smoke run
    .venv/bin/python benchmarks/blackbox.py --render docs/benchmarks/blackbox.json

Writes docs/benchmarks/blackbox[_quick].json; the Markdown tables are printed from the JSON.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.teachers.server
OUT = ROOT / "docs" / "benchmarks"


def teacher_tokens(store: Any, teacher_id: str) -> int:
    """Tokens the teacher generated into `store` (character tokenizer: characters + one EOS/stop)."""
    return sum(len(r.generation.text) + 1 for r in store.records(teacher_id))


def run_seed(
    seed: int, args: argparse.Namespace, server: Any, work: Path, problems: list[Any]
) -> dict[str, Any]:
    from kdkit.methods.gen_ssd import GenSSDSettings, run_gen_ssd
    from kdkit.methods.soda import SODASettings, run_soda
    from kdkit.models.lm import derive_student
    from kdkit.tasks.arithmetic import Problem, check_answer, exact_match_by_length, make_problems
    from kdkit.teachers import OpenAITeacher, ResponseStore, SamplingParams

    teacher_model = server.model
    tok = server.tokenizer
    params = SamplingParams(temperature=args.temperature, max_tokens=48, seed=None)
    student_params = SamplingParams(temperature=1.0, max_tokens=48)
    evaluate = lambda model: exact_match_by_length(model, tok, problems, batch_size=200)  # noqa: E731
    base = derive_student(teacher_model, keep_layers=3, intermediate_size=48)
    train_problems = make_problems(args.budget * 4, (1, 3), seed=1000 + seed)
    prompts = [p.prompt for p in train_problems]
    out: dict[str, Any] = {"seed": seed}

    def teacher() -> OpenAITeacher:
        return OpenAITeacher(server.url, "arithmetic", max_concurrency=4, timeout_s=60)

    # ---- seqkd + SODA (+ the on-policy baseline from the same warm-up) on `budget` prompts
    soda_prompts = prompts[: args.budget]
    warmed: dict[str, Any] = {}

    def on_warmed_up(model: torch.nn.Module) -> None:
        warmed["model"] = copy.deepcopy(model)
        warmed["em"] = evaluate(model)

    calls_before = len(server.events)
    student = copy.deepcopy(base)
    soda_settings = SODASettings(
        warmup_steps=args.steps,
        warmup_lr=1e-3,
        dpo_steps=args.dpo_steps,
        dpo_lr=args.dpo_lr,
        beta=args.beta,
        nll_weight=args.nll_weight,
        batch_size=32,
        seed=seed,
        student_params=student_params,
    )
    started = time.perf_counter()
    with ResponseStore(work / f"seqkd_soda_{seed}.sqlite") as store:
        soda = run_soda(
            student,
            tok,
            teacher(),
            store,
            soda_prompts,
            params,
            work / f"soda_{seed}",
            student_name=f"base-seed{seed}",
            settings=soda_settings,
            on_warmed_up=on_warmed_up,
        )
        soda_seconds = time.perf_counter() - started
        calls = len(server.events) - calls_before
        tokens = teacher_tokens(store, teacher().teacher_id)
        out["seqkd"] = {"exact_match": warmed["em"], "teacher_calls": calls, "teacher_tokens": tokens}
        out["soda"] = {
            "exact_match": evaluate(student),
            "teacher_calls": calls,
            "teacher_tokens": tokens,
            "seconds": soda_seconds,
            "snapshot_seconds": soda["snapshot_collection"]["seconds"],
            "dpo_seconds": soda["dpo_seconds"],
            "pairs": soda["pairs"],
            "dpo_final": soda["dpo_final"],
        }
        calls_before = len(server.events)
        on_policy_student = warmed["model"]
        baseline = run_soda(
            on_policy_student,
            tok,
            teacher(),
            store,
            soda_prompts,
            params,
            work / f"on_policy_{seed}",
            student_name=f"base-seed{seed}",
            settings=dataclasses.replace(soda_settings, warmup=False, on_policy=True),
        )
        out["on_policy_dpo"] = {
            "exact_match": evaluate(on_policy_student),
            "teacher_calls": out["soda"]["teacher_calls"] + len(server.events) - calls_before,
            "dpo_seconds": baseline["dpo_seconds"],
            "dpo_final": baseline["dpo_final"],
        }
    print(
        f"seed {seed}: seqkd {out['seqkd']['exact_match']} soda {out['soda']['exact_match']} "
        f"on-policy {out['on_policy_dpo']['exact_match']}",
        flush=True,
    )

    if args.skip_gen_ssd:
        return out
    # ---- Gen-SSD: cold start + selection until the same number of requests is spent
    student = copy.deepcopy(base)
    settings = GenSSDSettings(
        k=args.k,
        chunk_tokens=9,  # one worked column "a+b+c=ss|"
        threshold=args.threshold,
        max_chunks=6,
        temperature=args.temperature,
        cold_start_prompts=args.cold_start,
        cold_start_steps=args.steps // 2,
        finetune_steps=args.steps,
        lr=1e-3,
        max_requests=args.budget,
        seed=seed,
    )
    answers = {p.prompt: p for p in train_problems}

    def checker(prompt: str, text: str) -> bool:
        return check_answer(answers.get(prompt, Problem(0, 0, 1)), text)

    calls_before = len(server.events)
    started = time.perf_counter()
    with ResponseStore(work / f"genssd_{seed}.sqlite") as store:
        result = run_gen_ssd(
            student,
            tok,
            teacher(),
            store,
            prompts[args.budget :],  # the first cold_start of these are the cold-start prompts
            params,
            work / f"genssd_{seed}",
            settings=settings,
            checker=checker,
        )
        out["gen_ssd"] = {
            "exact_match": evaluate(student),
            "teacher_calls": len(server.events) - calls_before,
            "teacher_tokens": teacher_tokens(store, teacher().teacher_id),
            "seconds": time.perf_counter() - started,
            "selection": result["selection"],
            "finetune_samples": result["finetune_samples"],
        }
    print(f"seed {seed}: gen-ssd {out['gen_ssd']['exact_match']} {out['gen_ssd']['selection']}", flush=True)
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(values: list[float]) -> dict[str, float]:
        return {
            "mean": statistics.fmean(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        }

    out: dict[str, Any] = {}
    for method in ("seqkd", "soda", "on_policy_dpo", "gen_ssd"):
        entries = [r[method] for r in runs if method in r]
        if not entries:
            continue
        digits = sorted(entries[0]["exact_match"], key=int)
        out[method] = {
            "exact_match": {d: stat([e["exact_match"][d] for e in entries]) for d in digits},
            "overall": stat([statistics.fmean(e["exact_match"].values()) for e in entries]),
            "teacher_calls": stat([e["teacher_calls"] for e in entries]),
        }
        for key in ("teacher_tokens", "seconds", "dpo_seconds", "snapshot_seconds"):
            if key in entries[0]:
                out[method][key] = stat([e[key] for e in entries])
    return out


def render(data: dict[str, Any]) -> str:
    s = data["summary"]
    soda_s, onp = s["soda"], s["on_policy_dpo"]
    digits = sorted(s["seqkd"]["exact_match"], key=int)
    lines = [
        "| method | teacher calls | teacher tokens | "
        + " | ".join(f"EM {d}-digit" for d in digits)
        + " | EM mean |",
        "|---|---:|---:|" + "---:|" * (len(digits) + 1),
    ]
    pct = lambda x: f"{100 * x['mean']:.1f}% ± {100 * x['std']:.1f}"  # noqa: E731
    methods = (
        ("seqkd", "seqkd"),
        ("soda", "SODA"),
        ("on_policy_dpo", "on-policy DPO"),
        ("gen_ssd", "Gen-SSD"),
    )
    for name, label in methods:
        if name not in s:
            continue
        m = s[name]
        tokens = f"{m['teacher_tokens']['mean']:.0f}" if "teacher_tokens" in m else "same as SODA"
        cells = " | ".join(pct(m["exact_match"][d]) for d in digits)
        lines.append(
            f"| {label} | {m['teacher_calls']['mean']:.0f} | {tokens} | {cells} | {pct(m['overall'])} |"
        )
    lines += [
        "",
        "| DPO stage | wall time (s) | teacher calls |",
        "|---|---:|---:|",
        f"| SODA: snapshot + DPO | {soda_s['snapshot_seconds']['mean'] + soda_s['dpo_seconds']['mean']:.1f} "
        f"(snapshot {soda_s['snapshot_seconds']['mean']:.1f}) | {soda_s['teacher_calls']['mean']:.0f} |",
        f"| on-policy DPO (student sampled every step) | {onp['dpo_seconds']['mean']:.1f} ± "
        f"{onp['dpo_seconds']['std']:.1f} | {onp['teacher_calls']['mean']:.0f} |",
    ]
    if "gen_ssd" not in s:
        return "\n".join(lines)
    sel = [r["gen_ssd"]["selection"] for r in data["runs"]]
    lines += [
        "",
        "| Gen-SSD selection (per seed) | paths | finished | pruned | wrong | unfinished "
        "| selected mean tokens | teacher full-response mean tokens "
        "| student PPL selected | student PPL unselected |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run, r in zip(data["runs"], sel):
        fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"| seed {run['seed']} | {r['paths']} | {r['finished']} | {r['pruned']} | {r['wrong']} "
            f"| {r['unfinished']} | "
            f"{fmt(r['selected_mean_tokens'])} | {fmt(r.get('teacher_full_mean_tokens'))} | "
            f"{fmt(r['student_ppl_selected'])} | {fmt(r['student_ppl_unselected'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=256, help="teacher requests per method")
    parser.add_argument(
        "--cold-start", type=int, default=128, help="Gen-SSD's full responses for the cold start"
    )
    parser.add_argument("--steps", type=int, default=150, help="fine-tune steps (seqkd / warm-up / Gen-SSD)")
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--dpo-lr", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--nll-weight", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=1.5)
    parser.add_argument("--temperature", type=float, default=1.0, help="teacher sampling temperature")
    parser.add_argument("--eval-problems", type=int, default=400)
    parser.add_argument(
        "--skip-gen-ssd", action="store_true", help="seqkd, SODA and the on-policy baseline only"
    )
    parser.add_argument(
        "--out", type=Path, help="the JSON file to write (default docs/benchmarks/blackbox.json)"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render", type=Path)
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    if args.quick:
        args.seeds, args.budget, args.cold_start, args.steps, args.dpo_steps = [0], 48, 24, 20, 6
        args.eval_problems = 100
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    from tests.teachers.server import TinyLMServer

    from kdkit.pipelines.teachers import get_arithmetic_teacher
    from kdkit.tasks.arithmetic import make_problems

    teacher_model, tok, folder = get_arithmetic_teacher()
    problems = make_problems(args.eval_problems, (1, 4), seed=12345)
    started = time.perf_counter()
    runs = []
    with (
        TinyLMServer(teacher_model, tok, model_name="arithmetic") as server,
        tempfile.TemporaryDirectory() as tmp,
    ):
        from kdkit.tasks.arithmetic import exact_match_by_length

        teacher_em = exact_match_by_length(teacher_model, tok, problems, batch_size=200)
        for seed in args.seeds:
            runs.append(run_seed(seed, args, server, Path(tmp), problems))
    data = {
        "args": {k: v for k, v in vars(args).items() if k not in ("render", "out")},
        "teacher": {"folder": folder.name, "exact_match": teacher_em},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
        "wall_seconds": time.perf_counter() - started,
        "runs": runs,
        "summary": summarise(runs),
    }
    path = args.out or OUT / ("blackbox_quick.json" if args.quick else "blackbox.json")
    path.write_text(json.dumps(data, indent=2))
    print(render(data))
    print(f"wrote {path} in {data['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
