"""Students of a fine-tuned MiniLM Rotten Tomatoes teacher: layer selection and low-rank factorisation,
each trained with logit KD only, with MaKD, and from scratch on the same budget.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/students.py --seeds 0
    .venv/bin/python benchmarks/students.py --report-only      # rewrite the doc from the results

The students, arms and budget are read from the recipe (recipes/minilm-rotten-tomatoes-students.yaml,
a `kdkit run` config whose students are named <shape>.<arm>, all `method: makd`); the teacher is the
shared fine-tuned MiniLM (`kdkit.pipelines.text_teacher`, cached by content hash). Every finished run
appends one line to docs/benchmarks/students.jsonl (so an interrupted benchmark continues where it
stopped); the table (mean ± sample std over seeds) is written between the markers of
docs/benchmarks/students.md. Latency is measured on this CPU, all models side by side in one process,
batch 16 × ≤32 tokens.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.config.train import TrainConfig
from kdkit.engine.trainer import train
from kdkit.eval.footprint import count_parameters, measure_latency
from kdkit.methods.makd_distiller import MaKDDistiller, MaKDParams, accuracy
from kdkit.models.builders import derive_student, factorize, forward_flops, select_layers

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks" / "students.md"
RESULTS = ROOT / "docs" / "benchmarks" / "students.jsonl"
START, END = "<!-- results:start -->", "<!-- results:end -->"
MAX_LEN = 32  # student sequences (the CPU budget; the teacher was fine-tuned at 40)
BATCH = 16
EVAL_LIMIT = 400  # first examples of the fixed test split (the CPU budget; stated in the doc)

LATENCY_ROUNDS = 10  # interleaved rounds of 2 timed passes per model
RECIPE = ROOT / "recipes" / "minilm-rotten-tomatoes-students.yaml"
# Filled from the recipe (a `kdkit run` config whose students are named "<shape>.<arm>"):
STUDENTS: dict[str, dict[str, Any]] = {}  # shape -> {"keep_layers": ...} or {"budget": ...}
ARMS: dict[str, dict[str, Any]] = {}  # arm -> {shape: the student's makd parameters}
PRETRAINED: dict[str, bool] = {}  # arm -> whether its students start from the teacher's weights
# Learning rate per arm: the recipe's train.lr for the distilled arms; a freshly initialised
# transformer needs a larger step (a benchmark setting; in `kdkit run` every student shares train.lr).
ARM_LR = {"scratch": 3e-4}


def load_recipe(path: Path) -> dict[str, Any]:
    """Read the recipe (validated as a kdkit run config) into the module settings; returns its budget."""
    from kdkit.config import load_run_config

    global BATCH, EVAL_LIMIT
    cfg: Any = load_run_config(path)
    STUDENTS.clear()
    ARMS.clear()
    for run in cfg.students:
        shape, _, arm = run.name.partition(".")
        if run.method != "makd" or not arm:
            raise SystemExit(f"{path}: student {run.name!r}: name it <shape>.<arm> and use method makd")
        derived = (run.model or cfg.student).from_teacher
        if derived is None:
            raise SystemExit(f"{path}: student {run.name!r} must be built from the teacher (from_teacher)")
        spec = (
            {"budget": derived.budget} if derived.budget is not None else {"keep_layers": derived.keep_layers}
        )
        if STUDENTS.setdefault(shape, spec) != spec:
            raise SystemExit(f"{path}: the students of shape {shape!r} are built differently")
        ARMS.setdefault(arm, {})[shape] = dict(run.model_extra or {})
        PRETRAINED[arm] = derived.copy_weights
        ARM_LR.setdefault(arm, cfg.train.lr)
    BATCH = cfg.train.batch_size
    EVAL_LIMIT = cfg.eval.subset or EVAL_LIMIT
    finetune = cfg.teacher.finetune
    return {"steps": cfg.train.steps, "teacher_steps": finetune.steps if finetune else None}


# ----------------------------------------------------------------------------------------------
# The task: issue 7's Rotten Tomatoes splits and MiniLM loader (bring-your-own). Until that code is
# on this branch, load their modules by file from $KDKIT_ISSUE7_SRC (read only, default: their
# worktree); once merged, the plain imports below win and this adapter can go.


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        src = Path(os.environ.get("KDKIT_ISSUE7_SRC", "/work/wt/issue7/src"))
        path = src.joinpath(*name.split(".")).with_suffix(".py")
        if not path.exists():
            raise SystemExit(
                f"{name} is not installed and {path} does not exist: set KDKIT_ISSUE7_SRC"
            ) from None
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module


def tokenize(tokenizer: Any, texts: list[str], labels: list[int]) -> list[dict[str, torch.Tensor]]:
    encoded = tokenizer(texts, truncation=True, max_length=MAX_LEN)
    return [
        {"input_ids": torch.tensor(ids), "labels": torch.tensor(label)}
        for ids, label in zip(encoded["input_ids"], labels)
    ]


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)  # BERT pad id 0
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = s["input_ids"]
        mask[i, : len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([s["labels"] for s in samples])}


def batches(samples: list[dict[str, torch.Tensor]], size: int = 128) -> list[dict[str, torch.Tensor]]:
    return [collate(samples[i : i + size]) for i in range(0, len(samples), size)]


def load_task(train_limit: int | None) -> tuple[Any, dict[str, list[dict[str, torch.Tensor]]]]:
    rt = _module("kdkit.data.rotten_tomatoes")
    hf = _module("kdkit.models.hf")
    tokenizer = hf.load_tokenizer(hf.MINILM_SOURCE)
    data = {}
    for split in ("train", "test"):
        texts, labels = rt.load_rotten_tomatoes(split)
        if split == "train" and train_limit:
            texts, labels = texts[:train_limit], labels[:train_limit]
        if split == "test":
            texts, labels = texts[:EVAL_LIMIT], labels[:EVAL_LIMIT]
        data[split] = tokenize(tokenizer, texts, labels)
    return hf, data


def train_config(steps: int, seed: int, lr: float) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=BATCH,
        lr=lr,
        weight_decay=0.01,
        schedule="cosine",
        warmup_steps=steps // 10,
        mixed_precision="no",
        seed=seed,
        checkpoint_every=10**6,
        log_every=50,
        progress=False,
    )


def teacher(hf: Any, data: dict[str, list], steps: int) -> nn.Module:
    """The shared fine-tuned MiniLM Rotten Tomatoes teacher (`kdkit.pipelines.text_teacher`, cached
    by content hash; the same folder the bring-your-own recipe and benchmark use), with eager
    attention so MaKD can read its attention maps. `steps` other than the shared 80 fine-tunes (and
    caches) a teacher with that many steps instead."""
    from transformers import AutoModelForSequenceClassification

    from kdkit.pipelines.text_teacher import TEACHER_SETTINGS, rotten_tomatoes_teacher

    overrides = {} if steps == TEACHER_SETTINGS["steps"] else {"steps": steps, "warmup_steps": steps // 10}
    folder = rotten_tomatoes_teacher(**overrides)
    return AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()


def build(teacher_model: nn.Module, name: str, pretrained: bool, seed: int) -> tuple[nn.Module, Any]:
    spec = STUDENTS[name]
    if "keep_layers" in spec:
        kept = select_layers(teacher_model.config.num_hidden_layers, spec["keep_layers"])
        student = derive_student(teacher_model, keep_layers=kept, copy_weights=pretrained, seed=seed)
        return student, kept
    student, report = factorize(teacher_model, spec["budget"], copy_weights=pretrained, seed=seed)
    return student, report.ranks


def run_one(
    teacher_model: nn.Module, data: dict, name: str, arm: str, seed: int, steps: int
) -> dict[str, Any]:
    pretrained = PRETRAINED[arm]
    student, _ = build(teacher_model, name, pretrained=pretrained, seed=seed)
    params = MaKDParams(**ARMS[arm][name])
    distiller = MaKDDistiller(student, teacher_model if params.needs_teacher() else None, params)
    lr = ARM_LR.get(arm, 1e-4)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        train(distiller, data["train"], train_config(steps, seed, lr), Path(run), collate_fn=collate)
        history = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    last = [h for h in history if "loss" in h or any(k.startswith("train/") for k in h)][-1:]
    student = distiller.student.cpu().eval()
    return {
        "student": name,
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "test_acc": accuracy(student, batches(data["test"])),
        "parameters": count_parameters(student),
        "train_seconds": time.perf_counter() - started,
        "last_log": last[0] if last else {},
    }


def footprints(teacher_model: nn.Module, data: dict) -> dict[str, dict[str, float]]:
    """Parameters, FLOPs and CPU latency of teacher and every student shape, measured side by side."""
    example = collate(data["test"][:BATCH])
    example = {k: v for k, v in example.items() if k != "labels"}
    fixed = {k: v[:, :MAX_LEN] for k, v in example.items()}
    models = {"teacher": teacher_model}
    for name in STUDENTS:
        models[name] = build(teacher_model, name, pretrained=True, seed=0)[0].eval()
    # Interleaved rounds, the order reversed every round, so a change of machine load in the middle
    # of the measurement hits every model alike; the median of all timed passes per model.
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(LATENCY_ROUNDS):
        names = list(models) if round_ % 2 == 0 else list(reversed(models))
        for name in names:
            latency = measure_latency(models[name], fixed, repeats=2, warmup=1)
            times[name].append(latency["latency_ms_median"])
    out = {}
    for name, model in models.items():
        out[name] = {
            "parameters": count_parameters(model),
            "flops": forward_flops(model, fixed),
            "latency_ms": statistics.median(times[name]),
            "latency_p90_ms": sorted(times[name])[int(0.9 * (len(times[name]) - 1))],
            "threads": torch.get_num_threads(),
            "latency_rounds": LATENCY_ROUNDS,
        }
    return out


# ----------------------------------------------------------------------------------------------
# Report


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    teacher_acc = meta["teacher"]["test_acc"]
    foot = meta["footprint"]
    t = foot["teacher"]
    lines = [
        f"Teacher: fine-tuned all-MiniLM-L6-v2, test accuracy **{100 * teacher_acc:.1f}%**, "
        f"{t['parameters'] / 1e6:.2f}M parameters, {t['latency_ms']:.1f} ms per batch of "
        f"{BATCH} × ≤{MAX_LEN} tokens "
        f"({t['threads']} CPU threads).",
        "",
        "| student | parameters | FLOPs vs teacher | CPU latency (speed-up) | arm | test acc % "
        "| retained % | seeds |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name in STUDENTS:
        f = foot.get(name)
        if f is None:
            continue
        for arm in ARMS:
            runs = [r for r in results if r["student"] == name and r["arm"] == arm]
            if not runs:
                continue
            accs = [r["test_acc"] for r in runs]
            retained = [a / teacher_acc for a in accs]
            lines.append(
                f"| {name} | {f['parameters'] / 1e6:.2f}M ({f['parameters'] / t['parameters']:.0%}) "
                f"| {f['flops'] / t['flops']:.2f} "
                f"| {f['latency_ms']:.1f} ms ({t['latency_ms'] / f['latency_ms']:.2f}×) "
                f"| {arm} | {_mean_std(accs)} | {_mean_std(retained)} | {len(runs)} |"
            )
    lines += [
        "",
        f"Machine: {meta['machine']}; steps per student: {meta['steps']} of batch {BATCH}; "
        f"command: `{meta['command']}`"
        + (f"; footprint re-measured by `{meta['footprint_command']}`" if "footprint_command" in meta else "")
        + (f" (load average {meta['load_average'][0]:.1f})" if "load_average" in meta else "")
        + ".",
    ]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else f"# Students\n\n{START}\n{END}\n"
    head, _, rest = doc.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    global DOC, RESULTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--students", nargs="+", default=None, help="default: every student of the recipe")
    parser.add_argument("--arms", nargs="+", default=None, help="default: every arm of the recipe")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's train.steps")
    parser.add_argument("--teacher-steps", type=int, default=None, help="default: the recipe's teacher.steps")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--footprint", action="store_true",
        help="re-measure parameters, FLOPs and latency (with --report-only)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "benchmarks", help="folder of students.md/.jsonl"
    )
    args = parser.parse_args(argv)
    defaults = load_recipe(args.recipe)
    args.steps = args.steps or defaults["steps"] or 30
    args.teacher_steps = args.teacher_steps or defaults["teacher_steps"] or 80
    args.students = args.students or list(STUDENTS)
    args.arms = args.arms or list(ARMS)
    unknown = [n for n in args.students if n not in STUDENTS] + [a for a in args.arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"not in the recipe: {unknown}")
    DOC, RESULTS = args.out / "students.md", args.out / "students.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)

    hf, data = load_task(args.train_limit)
    teacher_model = teacher(hf, data, args.teacher_steps)
    meta_file = RESULTS.with_suffix(".meta.json")
    if not args.report_only or args.footprint or not meta_file.exists():
        meta = {
            "teacher": {
                "test_acc": accuracy(teacher_model, batches(data["test"])),
            },
            "footprint": footprints(teacher_model, data),
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
            "steps": args.steps,
            "command": "benchmarks/students.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        meta["load_average"] = os.getloadavg()
        if args.report_only and meta_file.exists():  # a re-measured footprint keeps the training command
            previous = json.loads(meta_file.read_text())
            meta.update({k: previous[k] for k in ("steps", "command") if k in previous})
            meta["footprint_command"] = "benchmarks/students.py " + " ".join(
                argv if argv is not None else sys.argv[1:]
            )
        meta_file.write_text(json.dumps(meta, indent=1))
        print(json.dumps(meta, indent=1), flush=True)
    meta = json.loads(meta_file.read_text())
    done = (
        {(r["student"], r["arm"], r["seed"]) for r in map(json.loads, RESULTS.read_text().splitlines())}
        if RESULTS.exists()
        else set()
    )
    if not args.report_only:
        for seed in args.seeds:
            for name in args.students:
                for arm in args.arms:
                    if (name, arm, seed) in done:
                        continue
                    result = run_one(teacher_model, data, name, arm, seed, args.steps)
                    print(json.dumps(result), flush=True)
                    with RESULTS.open("a") as handle:
                        handle.write(json.dumps(result) + "\n")
    results = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    write_doc(render(results, meta))


if __name__ == "__main__":
    main()
