"""Label-scarce Fashion-MNIST: few labelled images + the rest unlabelled; KD vs scratch over seeds.

    .venv/bin/python benchmarks/fashion_mnist.py --label-scarce            # the documented table
    .venv/bin/python benchmarks/fashion_mnist_label_scarce.py --labelled 1000 --seeds 0 1 2

The teacher is the benchmark config's CNN (trained once on the 55,000 labelled training images and
cached: it stands in for the model you already have). Each student is the config's MLP:

- scratch: cross-entropy on the `--labelled` images only (all that a label-only method can use);
- kd: `kdkit.distill` on all 55,000 training images, labels where known (-100 elsewhere), so the
  teacher's soft targets cover the unlabelled ones. The teacher's logits are computed once and
  reused by every KD student, so a KD student costs what a scratch student costs.

Same architecture, initial weights (per seed), step budget and optimiser for both. The labelled
subset is drawn with the seed, so the spread covers which images happen to be labelled. Results
(mean ± sample std) go between the label-scarce markers of docs/benchmarks/fashion_mnist.md.
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
from kdkit.config.classifier import ClassifierRunConfig
from kdkit.config.loading import load_yaml
from kdkit.data.examples import NO_LABEL, Examples
from kdkit.methods.any_model import LogitsAdapter
from kdkit.models.vision import build_vision_model
from kdkit.pipelines.classifier import load_data, load_or_train_teacher
from kdkit.pipelines.distill import predict

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- label-scarce:start -->", "<!-- label-scarce:end -->"
KD = {"temperature": 4.0, "alpha": 0.9}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "fashion_mnist_benchmark.yaml"))
    parser.add_argument("--labelled", type=int, default=1000, help="labelled training images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="default: the config's train.steps")
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmarks" / "fashion_mnist_label_scarce"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks" / "fashion_mnist.md"))
    parser.add_argument("--no-doc", action="store_true")
    return parser.parse_args(argv)


def labelled_subset(n: int, count: int, seed: int) -> torch.Tensor:
    """Indices of the `count` labelled examples among n (a seeded draw)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed))[:count].sort().values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg = ClassifierRunConfig.model_validate(load_yaml(args.config))
    train_set, test_set = load_data(cfg)
    teacher = load_or_train_teacher(cfg, train_set, test_set)
    settings = cfg.train.model_dump()
    settings.update(progress=False)
    if args.steps is not None:
        settings["steps"] = args.steps

    # One teacher pass over the training images, shared by every KD student of every seed.
    full = Examples(train_set.inputs, train_set.labels.clone())
    cache_started = time.perf_counter()
    teacher_logits = predict(LogitsAdapter(teacher), full, batch_size=1000)
    cache_s = time.perf_counter() - cache_started
    test = (test_set.inputs, test_set.labels)
    rows: dict[str, list[dict[str, Any]]] = {"teacher": [], "scratch": [], "kd": []}
    for seed in args.seeds:
        settings["seed"] = seed
        keep = labelled_subset(len(full), args.labelled, seed)
        few = Examples(train_set.inputs[keep], train_set.labels[keep])
        mixed_labels = torch.full_like(train_set.labels, NO_LABEL)
        mixed_labels[keep] = train_set.labels[keep]
        mixed = Examples(train_set.inputs, mixed_labels, teacher_logits=teacher_logits)
        out = Path(args.output) / f"seed{seed}"
        for name, data, method, params in (("scratch", few, "scratch", None), ("kd", mixed, "kd", KD)):
            torch.manual_seed(seed)
            student = build_vision_model(cfg.student.arch, cfg.student.params)
            result = kdkit.distill(
                teacher=teacher, student=student, data=data, eval_data=test, method=method,
                method_params=params, run_dir=out / name, student_name=name, latency_repeats=5, resume=True,
                log=lambda m: None, **settings,
            )
            rows[name].append({**result.metrics, "train_time_s": result.train_time_s})
            if name == "kd":
                rows["teacher"].append(result.rows[0])
            metrics = result.metrics
            print(f"seed {seed} {name}: accuracy {metrics['accuracy']:.4f} agreement "
                  f"{metrics['agreement']:.4f} train {result.train_time_s:.0f} s", flush=True)
    body = markdown(rows, args, cfg, settings, cache_s, time.perf_counter() - started, len(full))
    print(body)
    if not args.no_doc:
        write_doc(Path(args.doc), body)
    return 0


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(rows: dict[str, list[dict[str, Any]]], args: argparse.Namespace, cfg: ClassifierRunConfig,
             settings: dict[str, Any], cache_s: float, wall_s: float, n_train: int) -> str:
    def pct(name: str, key: str) -> str:
        values = [float(r[key]) for r in rows[name] if r.get(key) is not None]
        mean, std = mean_std(values)
        return f"{100 * mean:.2f} ± {100 * std:.2f}"

    def seconds(name: str) -> str:
        values = [float(r["train_time_s"]) for r in rows[name] if r.get("train_time_s") is not None]
        return f"{statistics.fmean(values):.0f}" if values else "—"

    kd_acc = [r["accuracy"] for r in rows["kd"]]
    scratch_acc = [r["accuracy"] for r in rows["scratch"]]
    gap = statistics.fmean(kd_acc) - statistics.fmean(scratch_acc)
    spread = max(mean_std(kd_acc)[1], mean_std(scratch_acc)[1])
    command = "python benchmarks/fashion_mnist.py --label-scarce " + " ".join(
        a for a in sys.argv[1:] if a != "--label-scarce")
    lines = [
        f"Command: `{command.strip()}` — seeds {args.seeds}, {args.labelled:,} labelled of "
        f"{n_train:,} training images, evaluated on the 10,000 test images; total wall time "
        f"{wall_s / 60:.1f} min (teacher logits of all training images: {cache_s:.1f} s, computed once).",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} (1 thread), load "
        f"average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())} (shared with other jobs).",
        "",
        f"Students: `{cfg.student.arch}` {cfg.student.params}, {settings['steps']} steps × "
        f"{settings['batch_size']}, lr {settings['lr']}; KD T={KD['temperature']}, α={KD['alpha']}.",
        "",
        "| model | trains on | accuracy % | agreement % | train time s |",
        "|---|---|---|---|---|",
        f"| teacher | {n_train:,} labelled (trained once, cached) | {pct('teacher', 'accuracy')} "
        "| 100.00 | — |",
        f"| scratch | {args.labelled:,} labelled | {pct('scratch', 'accuracy')} "
        f"| {pct('scratch', 'agreement')} | {seconds('scratch')} |",
        f"| kd | {args.labelled:,} labelled + {n_train - args.labelled:,} unlabelled "
        f"| {pct('kd', 'accuracy')} | {pct('kd', 'agreement')} | {seconds('kd')} |",
        "",
        f"KD − scratch: {100 * gap:+.2f} points, {gap / spread if spread else float('inf'):.1f}× the larger "
        "standard deviation (mean ± sample std over seeds).",
    ]
    return "\n".join(lines) + "\n"


def write_doc(path: Path, body: str) -> None:
    text = path.read_text() if path.is_file() else "# Fashion-MNIST benchmark\n"
    if START not in text or END not in text:
        text += f"\n## Label-scarce\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{body}{END}{tail}")


if __name__ == "__main__":
    raise SystemExit(main())
