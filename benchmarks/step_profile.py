"""Where a kdkit training step's time goes: sampling, teacher, student forward, loss, backward, optimizer.

Runs kdkit's engine on the models of benchmarks/lm_policies.py part 2 (the same samples, batch,
max_new_tokens, JSD β=0.5, AdamW lr 1e-4) inside `kdkit.engine.phases.PhaseTimer`, which times the
named phases the engine and `LMDistiller` mark in every step (`phase("teacher")`, ...; they are
also `torch.profiler.record_function` ranges, so a torch.profiler trace shows the same names).
Off-policy (λ=0: dataset completions) and on-policy (λ=1: the student samples every batch), each
with kdkit's default loss on full logits and with `fused: true` (hidden states projected in chunks).
The first `--warmup` steps are not counted; the table is the mean over the next `--steps`.

Phases: data (next batch), sample (generation), teacher (the teacher's forward pass), student
forward, loss (the objective without the student forward it triggers), backward, optimizer
(gradient normalisation and clipping, AdamW, lr schedule, zeroing), other (the rest of the step:
the engine's bookkeeping, diagnostics).

    .venv/bin/python benchmarks/step_profile.py                       # SmolLM2, ~4 min on a shared 2-core CPU
    .venv/bin/python benchmarks/step_profile.py --models arithmetic   # the tiny arithmetic pair, ~1 min
    python3 benchmarks/step_profile.py --device cuda --random-weights --out DIR   # GPU: float32, batch 8

On a GPU the phases are timed after a device synchronise at every phase boundary (PhaseTimer), so
each phase is charged its kernels; the synchronisations themselves remove the CPU/GPU overlap of an
unprofiled step, so s/step here is an upper bound of the unprofiled step (lm_policies.py times that).

Writes docs/benchmarks/step_profile[_arithmetic].json and .png and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kdkit.config import load_run_config  # noqa: E402
from kdkit.pipelines.lm import build_distiller, build_student  # noqa: E402
from lm_policies import (  # noqa: E402
    RECIPE,
    SMOLLM2_RECIPE,
    benchmark_teacher,
    chat_ids,
    chat_tokenizer,
    choose_device,
    choose_precision,
    docs_samples,
    timing_train_config,
)

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
#: table/plot order; "student_forward" is reported apart from the loss that triggers it
SHOWN = ("data", "sample", "teacher", "student_forward", "loss", "backward", "optimizer", "other")


def profile_steps(
    cfg: Any,
    teacher: Any,
    tokenizer: Any,
    samples: list[dict],
    *,
    lmbda: float,
    fused: bool,
    steps: int,
    warmup: int,
    batch_size: int,
    max_new_tokens: int,
    work: Path,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Seconds per phase of each counted step of kdkit's gkd recipe (λ, fused) through the engine."""
    from kdkit.config.lm import LMStudentRun
    from kdkit.engine import train
    from kdkit.engine.phases import PhaseTimer
    from kdkit.samplers.collate import PromptCompletionCollator

    torch.manual_seed(seed)
    student, _ = build_student(cfg, teacher, tokenizer)
    spec = LMStudentRun(
        name="profile",
        method="gkd",
        lmbda=lmbda,
        beta=0.5,
        fused=fused,
        max_new_tokens=max_new_tokens,
        sampling_temperature=1.0,
    )
    distiller = build_distiller(spec, student, teacher, tokenizer)
    # the one log and checkpoint come after the last timed phase
    train_cfg = timing_train_config(cfg, warmup=warmup, steps=steps, batch_size=batch_size, seed=seed,
                                    log_every=warmup + steps, precision=precision)
    collate = PromptCompletionCollator(tokenizer, add_eos=False)
    with PhaseTimer() as timer:
        train(distiller, samples, train_cfg, work, collate_fn=collate)
    counted = timer.steps()[warmup:]
    rows = []
    for step in counted:
        row = {name: step.get(name, 0.0) for name in ("data", "sample", "teacher", "student_forward")}
        row["loss"] = step.get("loss", 0.0) - step.get("student_forward", 0.0)  # the loss's own work
        row |= {name: step.get(name, 0.0) for name in ("backward", "optimizer")}
        row["other"] = step["step"] - sum(row.values())
        row["step"] = step["step"]
        rows.append(row)
    mean = {name: statistics.fmean(r[name] for r in rows) for name in (*SHOWN, "step")}
    return {"lmbda": lmbda, "fused": fused, "steps": rows, "mean_s": mean}


def render(result: dict[str, Any]) -> str:
    lines = [
        "| step | s/step | " + " | ".join(SHOWN) + " |",
        "|---|---:|" + "---:|" * len(SHOWN),
    ]
    for name, entry in result["profiles"].items():
        mean = entry["mean_s"]
        if mean["step"] < 1.0:  # a GPU step: milliseconds
            cells = " | ".join(f"{mean[p] * 1e3:.1f} ms ({mean[p] / mean['step']:.0%})" for p in SHOWN)
            lines.append(f"| {name} | {mean['step']:.4f} | {cells} |")
            continue
        cells = " | ".join(f"{mean[p]:.3f} s ({mean[p] / mean['step']:.0%})" for p in SHOWN)
        lines.append(f"| {name} | {mean['step']:.3f} | {cells} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["profiles"])
    fig, ax = plt.subplots(figsize=(8.0, 0.6 * len(names) + 1.6))
    colours = plt.get_cmap("tab10").colors
    for y, name in enumerate(names):
        left = 0.0
        for i, phase_name in enumerate(SHOWN):
            width = result["profiles"][name]["mean_s"][phase_name]
            ax.barh(y, width, left=left, color=colours[i], label=phase_name if y == 0 else None)
            left += width
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per optimizer step (mean of the counted steps)")
    where = result.get("gpu") or f"{result['threads']} CPU thread(s)"
    ax.set_title(f"kdkit step profile: {result['models']} (batch {result['batch_size']}, {where}, "
                 f"{result.get('precision', 'fp32')})")
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=("smollm2", "arithmetic"), default="smollm2")
    parser.add_argument("--steps", type=int, default=None, help="counted steps per profile")
    parser.add_argument("--warmup", type=int, default=None, help="uncounted steps first")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: arithmetic 16; SmolLM2 4 on a CPU, 8 on a GPU")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: float32 (as lm_policies.py; bf16: kdkit's bf16 autocast)")
    parser.add_argument("--random-weights", action="store_true",
                        help="SmolLM2 built from its config.json with random weights (no weights needed)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 1 counted step")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/benchmarks)")
    parser.add_argument("--render", type=Path, help="print the Markdown table of a result JSON and exit")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(render(json.loads(args.render.read_text())))
        return 0
    device = choose_device(args.device)
    precision = choose_precision(args.precision, device)
    gpu = device == "cuda"
    torch.set_num_threads(args.threads)
    smollm2 = args.models == "smollm2"
    cfg = load_run_config(SMOLLM2_RECIPE if smollm2 else RECIPE)
    batch_size, max_new_tokens = ((8 if gpu else 4), 32) if smollm2 else (16, 48)
    batch_size = args.batch_size or batch_size
    if args.quick:
        steps, warmup = args.steps or 1, args.warmup or 1
    elif gpu:
        steps, warmup = args.steps or 8, args.warmup or 3
    else:
        steps, warmup = args.steps or (3 if smollm2 else 20), args.warmup or (1 if smollm2 else 3)
    teacher, tokenizer = benchmark_teacher(cfg, random_weights=args.random_weights, device=device)
    count = (warmup + steps) * batch_size * 2
    if smollm2:
        texts = docs_samples(tokenizer, count, 32, max_new_tokens)
    else:
        from kdkit.tasks.arithmetic import arithmetic_dataset

        texts = arithmetic_dataset(count, tuple(cfg.data.train_digits), seed=7)
        tokenizer = chat_tokenizer(tokenizer)
    samples = chat_ids(tokenizer, texts)
    result: dict[str, Any] = {
        "models": args.models,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "steps": steps,
        "warmup": warmup,
        "threads": args.threads,
        "device": device,
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "precision": precision,
        "random_weights": args.random_weights and smollm2,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "profiles": {},
        "errors": {},
    }
    suffix = "" if smollm2 else "_arithmetic"
    out = args.out or OUT
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kdkit-step-profile-") as tmp:
        for label, lmbda in (("off-policy", 0.0), ("on-policy", 1.0)):
            for fused in (False, True):
                name = f"{label}{', fused' if fused else ''}"
                started = time.perf_counter()
                try:
                    entry = profile_steps(
                        cfg,
                        teacher,
                        tokenizer,
                        samples,
                        lmbda=lmbda,
                        fused=fused,
                        steps=steps,
                        warmup=warmup,
                        batch_size=batch_size,
                        max_new_tokens=max_new_tokens,
                        work=Path(tmp) / name.replace(", ", "-"),
                        precision=precision,
                    )
                except Exception as error:  # one failing profile must not end the whole (GPU) run
                    traceback.print_exc()
                    result["errors"][name] = f"{type(error).__name__}: {error}"
                    continue
                result["profiles"][name] = entry
                print(f"{name}: {entry['mean_s']['step']:.3f} s/step ({time.perf_counter() - started:.1f} s "
                      "with set-up)", flush=True)
                (out / f"step_profile{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    result["load_average_end"] = list(os.getloadavg())
    result["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / f"step_profile{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    if result["profiles"]:
        plot(result, out / f"step_profile{suffix}.png")
        print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
