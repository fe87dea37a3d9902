"""Text classifier: MiniLM-L6 teacher (fine-tuned on Rotten Tomatoes) → 2-layer students, KD vs scratch.

    .venv/bin/python benchmarks/text_classifier.py --seeds 0 1 2 --steps 60 --transfer 1920 --eval-size 1000
                                                                         # the documented table

Settings come from recipes/minilm-rotten-tomatoes.yaml (teacher fine-tuning, student layer
selection, methods, optimiser); the benchmark adds seeds and, to fit a shared CPU, a transfer set
of `--transfer` training snippets and an evaluation subset of `--eval-size` test snippets (both
fixed random draws). The teacher is fine-tuned once and cached; its logits on the transfer set are
computed once and shared by every KD student. Both students start from the same layer-selected
copy of the teacher (blocks 0 and 5 + its head); seeds change the data order and dropout.
Results go between the markers of docs/benchmarks/text_classifier.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import kdkit
from kdkit.config import load_run_config
from kdkit.data.examples import as_examples
from kdkit.data.rotten_tomatoes import export_csv
from kdkit.eval import classifier_metrics, count_parameters, measure_latency
from kdkit.methods.any_model import LogitsAdapter
from kdkit.models.hf import load_tokenizer
from kdkit.paths import cache_dir
from kdkit.pipelines.any_model import build_student, build_teacher, load_split
from kdkit.pipelines.distill import predict

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "minilm-rotten-tomatoes.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60, help="student steps (the recipe's own: 100)")
    parser.add_argument("--transfer", type=int, default=1920, help="training snippets the students see")
    parser.add_argument("--eval-size", type=int, default=1000, help="test snippets evaluated")
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmarks" / "text_classifier"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks" / "text_classifier.md"))
    parser.add_argument("--no-doc", action="store_true")
    return parser.parse_args(argv)


def draw(n: int, count: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values.tolist()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    csv_dir = cache_dir("data", "rotten-tomatoes-csv")
    files = export_csv(csv_dir)
    cfg = load_run_config(args.recipe, [f"data.train={files['train']}", f"data.eval={files['test']}"])
    train_data, eval_data = load_split(cfg.data, "train"), load_split(cfg.data, "eval")
    teacher_started = time.perf_counter()
    teacher, tokenizer_source = build_teacher(cfg, train_data, None, print)
    teacher_load_s = time.perf_counter() - teacher_started
    tokenizer = load_tokenizer(tokenizer_source)
    options = {"input_column": "text", "label_column": "label", "tokenizer": tokenizer,
               "max_length": cfg.data.max_length}
    transfer = as_examples(train_data, **options)
    transfer = transfer.take(draw(len(transfer), args.transfer, 1))
    test = as_examples(eval_data, **options)
    test = test.take(draw(len(test), args.eval_size, 2))
    t_adapter = LogitsAdapter(teacher).eval()
    cache_started = time.perf_counter()
    transfer.teacher_logits = predict(t_adapter, transfer, batch_size=64)
    cache_s = time.perf_counter() - cache_started
    teacher_logits = predict(t_adapter, test, batch_size=64)
    print(f"teacher logits: transfer {cache_s:.0f} s", flush=True)
    one = test.batch([0])
    rows: dict[str, list[dict[str, Any]]] = {"teacher": [], "scratch": [], "kd": []}
    teacher_row = {**_strip(classifier_metrics(teacher_logits, test.labels)), "agreement": 1.0,
                   "kl_to_teacher": 0.0, "parameters": count_parameters(teacher),
                   "latency_ms": measure_latency(t_adapter, one, repeats=10)["latency_ms_per_example"]}
    rows["teacher"].append(teacher_row)
    settings = cfg.train.model_dump()
    settings.update(progress=False)
    if args.steps is not None:
        settings["steps"] = args.steps
    runs = {run.name: run for run in cfg.students}
    for seed in args.seeds:
        settings["seed"] = seed
        for name in ("scratch", "kd"):
            run = runs[name]
            student = build_student(cfg.student, teacher, seed)
            result = kdkit.distill(
                teacher=teacher, student=student, data=transfer, method=run.method,
                method_params=dict(run.model_extra or {}), tokenizer=tokenizer, report=False,
                run_dir=Path(args.output) / f"seed{seed}", student_name=name, resume=True, log=lambda m: None,
                **settings,
            )
            adapter = LogitsAdapter(result.student).eval()
            logits = predict(adapter, test, batch_size=64)
            row = _strip(classifier_metrics(logits, test.labels, teacher_logits))
            row.update(parameters=count_parameters(result.student), train_time_s=result.train_time_s,
                       latency_ms=measure_latency(adapter, one, repeats=10)["latency_ms_per_example"])
            rows[name].append(row)
            print(f"seed {seed} {name}: accuracy {row['accuracy']:.4f} agreement {row['agreement']:.4f} "
                  f"train {result.train_time_s:.0f} s", flush=True)
        # after every seed, so a run stopped early still leaves the seeds it finished
        done = args.seeds[: args.seeds.index(seed) + 1]
        wall = time.perf_counter() - started
        body = markdown(rows, args, cfg, settings, cache_s, teacher_load_s, wall, done)
        print(body, flush=True)
        if not args.no_doc:
            write_doc(Path(args.doc), body)
    return 0


def _strip(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "reliability"}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(
    rows: dict[str, list[dict[str, Any]]], args: argparse.Namespace, cfg: Any, settings: dict[str, Any],
    cache_s: float, teacher_s: float, wall_s: float, seeds: list[int],
) -> str:
    def pct(name: str, key: str) -> str:
        mean, std = mean_std([float(r[key]) for r in rows[name]])
        return f"{100 * mean:.2f} ± {100 * std:.2f}"

    def num(name: str, key: str, digits: int = 1) -> str:
        values = [float(r[key]) for r in rows[name] if r.get(key) is not None]
        return f"{statistics.fmean(values):.{digits}f}" if values else "—"

    command = "python benchmarks/text_classifier.py " + " ".join(sys.argv[1:])
    ft = cfg.teacher.finetune
    lines = [
        f"Command: `{command.strip()}` — seeds {seeds}; total wall time {wall_s / 60:.1f} min "
        f"(teacher from cache in {teacher_s:.0f} s; its logits on the transfer set {cache_s:.0f} s, once).",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} (1 thread), load "
        f"average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())} (shared with ~9 other jobs).",
        "",
        f"Scale: teacher fine-tuned {ft.steps} steps × {ft.batch_size} (max {cfg.data.max_length} tokens); "
        f"students {settings['steps']} steps × {settings['batch_size']} on {args.transfer:,} training "
        f"snippets, lr {settings['lr']}; evaluated on {args.eval_size:,} of the 2,000 test snippets.",
        "",
        "| model | method | accuracy % | agreement % | KL(T‖S) nats | parameters | latency ms/example | "
        "train time s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, method in (("teacher", "MiniLM-L6, fine-tuned (CE)"), ("scratch", "2 layers, CE on labels"),
                         ("kd", "2 layers, KD T=2 α=0.5")):
        lines.append(
            f"| {name} | {method} | {pct(name, 'accuracy')} | {pct(name, 'agreement')} | "
            f"{num(name, 'kl_to_teacher', 4)} | {int(rows[name][0]['parameters']):,} | "
            f"{num(name, 'latency_ms', 2)} | {num(name, 'train_time_s', 0)} |"
        )
    lines += ["", "Mean ± sample standard deviation over seeds (the teacher is one model, evaluated once)."]
    return "\n".join(lines) + "\n"


def write_doc(path: Path, body: str) -> None:
    text = path.read_text() if path.is_file() else f"# Text classifier benchmark\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{START}\n{body}{END}{tail}")


if __name__ == "__main__":
    raise SystemExit(main())
