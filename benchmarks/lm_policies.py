"""LM distillation policies on the arithmetic task, and kdkit's training throughput against TRL's GKDTrainer.

Part 1 (policies): the cached arithmetic teacher distilled into a 2-layer student by scratch (CE, no
teacher), off-policy forward KL, on-policy reverse KL, on-policy JSD(0.5) and GKD (λ=0.5) at equal
optimizer steps, over several seeds: exact match by operand length (mean ± std), wall time.
The students train on shorter problems than they are tested on, so exposure bias shows.

Part 2 (throughput): kdkit's `LMDistiller` (gkd recipe, λ=0 and λ=1) and TRL 1.16's `GKDTrainer`
(lmbda=0 and 1) on identical models, data, batch size, max_new_tokens and sampling temperature, run
alternately in one process: completion tokens per second after warm-up and generation's share of
the step.

    .venv/bin/python benchmarks/lm_policies.py            # ~20 min on a shared 2-core CPU
    .venv/bin/python benchmarks/lm_policies.py --quick    # smoke run, ~2 min
    .venv/bin/python benchmarks/lm_policies.py --throughput-models smollm2 --threads 2   # ~5 min

`--throughput-models smollm2` runs part 2 only, at a realistic size: the SmolLM2-135M-Instruct teacher,
a student derived from every third layer (recipes/smollm2-python-docs-cpu.yaml), Python-docs prompts
(32 tokens, 32 completion tokens) rendered through SmolLM2's own chat template; stored as
`throughput_smollm2` in lm_policies.json.

Writes docs/benchmarks/lm_policies[_quick].json and .png; the Markdown document is written from the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdkit.config import load_run_config
from kdkit.config.lm import LMRunConfig
from kdkit.pipelines.lm import build_distiller, build_student, load_lm_data, load_teacher

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "arithmetic-policies.yaml"
SMOLLM2_RECIPE = ROOT / "recipes" / "smollm2-python-docs-cpu.yaml"
OUT = ROOT / "docs" / "benchmarks"


# ----------------------------------------------------------------------------- part 1: policies


def policy_runs(cfg: LMRunConfig, seeds: list[int], work: Path) -> dict[str, Any]:
    """Train every student of `cfg` once per seed; exact match by length on fixed held-out problems."""
    from kdkit.engine import train
    from kdkit.tasks.arithmetic import exact_match_by_length, make_problems

    teacher, tokenizer = load_teacher(cfg, log=lambda _: None)
    # the same graded problems for every seed and variant
    problems = make_problems(cfg.eval.exact_match_problems, tuple(cfg.data.eval_digits), seed=12345)
    reference = {
        "teacher": exact_match_by_length(teacher, tokenizer, problems, batch_size=128),
        "student_init": exact_match_by_length(build_student(cfg, teacher, tokenizer)[0], tokenizer, problems),
    }
    print(f"teacher {reference['teacher']}  initial student {reference['student_init']}", flush=True)
    runs = []
    for seed in seeds:
        seeded = cfg.model_copy(deep=True)
        seeded.train.seed = seed
        seeded.data.seed = seed  # a different stream of training problems per seed
        data = load_lm_data(seeded, tokenizer)
        for student_cfg in seeded.students:
            student, _ = build_student(seeded, teacher, tokenizer)
            torch.manual_seed(seed)
            distiller = build_distiller(student_cfg, student, teacher, tokenizer)
            result = train(
                distiller,
                data.train,
                seeded.train,
                work / f"{student_cfg.name}-{seed}",
                collate_fn=data.collate,
                description=f"{student_cfg.name} seed {seed}",
            )
            accuracy = exact_match_by_length(distiller.student.eval(), tokenizer, problems, batch_size=128)
            gen_s = _history_sum(result.history_path, "diag/gen_s", seeded.train.log_every)
            runs.append(
                {
                    "variant": student_cfg.name,
                    "method": student_cfg.method,
                    "seed": seed,
                    "wall_s": result.wall_time_s,
                    "generation_s": gen_s,
                    "exact_match": {str(k): v for k, v in accuracy.items()},
                    "final_losses": result.final_losses,
                }
            )
            print(f"{student_cfg.name:<14} seed {seed}: {result.wall_time_s:6.1f} s  {accuracy}", flush=True)
    return {"reference": {k: {str(d): a for d, a in v.items()} for k, v in reference.items()}, "runs": runs}


def _history_sum(path: Path, key: str, log_every: int) -> float:
    """Σ over logged windows of (window mean of `key`) × steps per window ≈ total over the run."""
    if not path.is_file():
        return 0.0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    total, previous = 0.0, 0
    for record in records:
        total += record.get(key, 0.0) * (record["step"] - previous)
        previous = record["step"]
    return total


# ----------------------------------------------------------------------------- part 2: throughput


def chat_tokenizer(tokenizer: Any) -> Any:
    """The arithmetic tokenizer with a chat template TRL can use: `<bos>prompt` then `completion<eos>`.

    TRL's GKDTrainer accepts only a `messages` column rendered through a chat template, so a task
    with plain prompt/completion text needs one written for it (kdkit reads the pairs directly).
    """
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    )
    return tokenizer


def kdkit_throughput(
    cfg: LMRunConfig,
    teacher: Any,
    tokenizer: Any,
    samples: list[dict],
    *,
    lmbda: float,
    steps: int,
    warmup: int,
    batch_size: int,
    max_new_tokens: int,
    work: Path,
    collate: Callable[[list[dict]], Any] | None = None,
) -> dict[str, float]:
    """Completion tokens/s of kdkit's gkd recipe over `steps` timed steps after `warmup` steps.

    collate: the batch builder (default: PromptCompletionCollator over prompt/completion text).
    """
    from kdkit.config.lm import LMStudentRun
    from kdkit.engine import train
    from kdkit.samplers.collate import PromptCompletionCollator

    student, _ = build_student(cfg, teacher, tokenizer)
    spec = LMStudentRun(
        name="tp",
        method="gkd",
        lmbda=lmbda,
        max_new_tokens=max_new_tokens,
        sampling_temperature=1.0,
    )
    distiller = build_distiller(spec, student, teacher, tokenizer)
    # log only at the end of warm-up and at the end (like TRL's logging_steps here), so per-step
    # logging costs neither tool anything; each record averages its window's steps
    train_cfg = cfg.train.model_copy(
        update={
            "steps": warmup + steps,
            "batch_size": batch_size,
            "log_every": warmup,
            "checkpoint_every": 10_000,
            "progress": False,
            "schedule": "constant",
            "warmup_steps": 0,
            "lr": 1e-4,
        }
    )
    collate = collate or PromptCompletionCollator(tokenizer)
    result = train(distiller, samples, train_cfg, work, collate_fn=collate)
    records = [json.loads(line) for line in result.history_path.read_text().splitlines() if line.strip()]
    start = next(r for r in records if r["step"] == warmup)
    timed = [r for r in records if r["step"] > warmup]
    seconds = timed[-1]["elapsed_s"] - start["elapsed_s"]
    tokens = generation = 0.0
    previous = warmup
    for record in timed:  # window means × window steps
        tokens += record["diag/tokens"] * (record["step"] - previous)
        generation += record.get("diag/gen_s", 0.0) * (record["step"] - previous)
        previous = record["step"]
    return _rates(tokens, seconds, generation, steps)


def trl_throughput(
    teacher: Any,
    student: Any,
    tokenizer: Any,
    samples: list[dict],
    *,
    lmbda: float,
    steps: int,
    warmup: int,
    batch_size: int,
    max_new_tokens: int,
    work: Path,
) -> dict[str, float]:
    """Completion tokens/s of TRL's GKDTrainer (JSD β=0.5) on the same models and samples.

    tokenizer must carry a chat template (see `chat_tokenizer` for the arithmetic one).
    """
    import datasets
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Timed(GKDTrainer):
        tokens: list[int] = []
        generation: list[float] = []

        def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
            self._gen = 0.0
            loss = super().training_step(model, inputs, num_items_in_batch)
            # after super(): inputs hold what was trained on (the student's samples when on-policy)
            Timed.tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
            Timed.generation.append(self._gen)
            return loss

        def generate_on_policy_outputs(self, model, inputs, generation_config):  # type: ignore[override]
            started = time.perf_counter()
            out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            self._gen += time.perf_counter() - started
            return out

    class Clock(TrainerCallback):
        stamps: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
            Clock.stamps.append(time.perf_counter())

    Timed.tokens, Timed.generation, Clock.stamps = [], [], []
    dataset = datasets.Dataset.from_list([{"messages": messages(s)} for s in samples])
    args = GKDConfig(
        output_dir=str(work),
        per_device_train_batch_size=batch_size,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_steps=warmup + steps,
        lmbda=lmbda,
        beta=0.5,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        logging_steps=10_000,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
    )
    trainer = Timed(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    seconds = Clock.stamps[-1] - Clock.stamps[warmup - 1]
    tokens = sum(Timed.tokens[warmup:])
    generation = sum(Timed.generation[warmup:])
    return _rates(tokens, seconds, generation, steps)


def _rates(tokens: float, seconds: float, generation: float, steps: int) -> dict[str, float]:
    return {
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "tokens": tokens,
        "steps": steps,
        "s_per_step": seconds / steps,
        "generation_share": generation / seconds,
    }


def messages(sample: dict) -> list[dict[str, str]]:
    """A prompt/completion sample as the user/assistant turns TRL's GKDTrainer requires."""
    return [
        {"role": "user", "content": sample["prompt"]},
        {"role": "assistant", "content": sample["completion"]},
    ]


def check_same_tokens(
    tokenizer: Any, samples: list[dict], kd_samples: list[dict], collate: Callable[[list[dict]], Any]
) -> None:
    """kdkit's collation of `kd_samples` and TRL's chat collation of `samples` must give identical
    input ids and identical trained (label) positions; `tokenizer` carries the chat template."""
    from trl.experimental.utils import DataCollatorForChatML

    ours = collate(kd_samples[:4])
    theirs = DataCollatorForChatML(tokenizer=tokenizer)([{"messages": messages(s)} for s in samples[:4]])
    for row in range(4):
        for key in ("input_ids", "labels"):
            a = ours[key][row][ours["attention_mask"][row].bool()].tolist()
            b = theirs[key][row][theirs["attention_mask"][row].bool()].tolist()
            if a != b:
                raise AssertionError(f"kdkit and TRL collate sample {row} differently ({key}): {a} vs {b}")


def docs_samples(tokenizer: Any, count: int, prompt_tokens: int, completion_tokens: int) -> list[dict]:
    """`count` prompt/completion text pairs cut from consecutive Python-docs token blocks.

    Each block of prompt_tokens + completion_tokens ids is decoded back to text (TRL reads text);
    re-tokenising may change the counts by a token or two, identically for both tools.
    """
    from kdkit.data.python_docs import load_python_docs

    block = prompt_tokens + completion_tokens
    blocks = load_python_docs(tokenizer, "train", block_size=block, max_tokens=block * (count + 1))
    samples = []
    for index in range(min(count, len(blocks))):
        ids = blocks[index]["input_ids"].tolist()
        samples.append(
            {
                "prompt": tokenizer.decode(ids[:prompt_tokens]),
                "completion": tokenizer.decode(ids[prompt_tokens:]),
            }
        )
    return samples


def chat_ids(tokenizer: Any, samples: list[dict]) -> list[dict[str, list[int]]]:
    """Each sample as the prompt/completion ids TRL trains on: the chat-rendered conversation split
    where its labels begin (the completion ends with the template's end-of-turn tokens)."""
    from trl.experimental.utils import DataCollatorForChatML

    collator = DataCollatorForChatML(tokenizer=tokenizer)
    out = []
    for sample in samples:
        batch = collator([{"messages": messages(sample)}])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        keep = batch["attention_mask"][0].bool()
        ids, labels = ids[keep].tolist(), labels[keep].tolist()
        start = next(i for i, label in enumerate(labels) if label != -100)
        out.append({"prompt_ids": ids[:start], "completion_ids": ids[start:]})
    return out


def throughput(
    cfg: LMRunConfig,
    *,
    steps: int,
    warmup: int,
    batch_size: int,
    max_new_tokens: int,
    work: Path,
    repeats: int = 3,
    task: str = "arithmetic",
    prompt_tokens: int = 32,
) -> dict[str, Any]:
    """kdkit and TRL alternately (so both see the same machine load), off-policy then on-policy.

    task: "arithmetic" (the character-level teacher, a hand-written plain chat template) or
    "smollm2" (Python-docs prompts of `prompt_tokens` tokens with `max_new_tokens`-token completions,
    rendered through SmolLM2-Instruct's own chat template, which adds its default system turn).
    """
    from kdkit.samplers.collate import PromptCompletionCollator

    teacher, tokenizer = load_teacher(cfg, log=lambda _: None)
    count = (warmup + steps) * batch_size * 2
    if task == "arithmetic":
        from kdkit.tasks.arithmetic import arithmetic_dataset

        samples = arithmetic_dataset(count, tuple(cfg.data.train_digits), seed=7)
        tokenizer = chat_tokenizer(tokenizer)
        kd_samples, collate = samples, PromptCompletionCollator(tokenizer)
    else:
        samples = docs_samples(tokenizer, count, prompt_tokens, max_new_tokens)
        # kdkit trains on exactly TRL's ids (template tokens included); they already end in the
        # end-of-turn token, so the collator must not append another EOS
        kd_samples = chat_ids(tokenizer, samples)
        collate = PromptCompletionCollator(tokenizer, add_eos=False)
    check_same_tokens(tokenizer, samples, kd_samples, collate)
    # One untimed run of each tool first: process-wide first-use costs (imports such as
    # TensorBoard's on the engine's first log, kernel warm-up) would otherwise land in round 0.
    first_use = {"lmbda": 1.0, "steps": 1, "warmup": 1, "batch_size": batch_size, "max_new_tokens": 8}
    kdkit_throughput(
        cfg, teacher, tokenizer, kd_samples, work=work / "first-use-kdkit", collate=collate, **first_use
    )
    student, _ = build_student(cfg, teacher, tokenizer)
    trl_throughput(teacher, student, tokenizer, samples, work=work / "first-use-trl", **first_use)
    results: dict[str, Any] = {}
    for label, lmbda in (("off_policy", 0.0), ("on_policy", 1.0)):
        options = {
            "lmbda": lmbda,
            "steps": steps,
            "warmup": warmup,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
        }
        runs: dict[str, list[dict[str, float]]] = {"kdkit": [], "trl": []}
        for round_ in range(repeats):
            # alternate which tool goes first, so a drift in the machine's load hits both alike
            order = ("kdkit", "trl") if round_ % 2 == 0 else ("trl", "kdkit")
            for tool in order:
                folder = work / f"{tool}-{label}-{round_}"
                torch.manual_seed(round_)
                if tool == "kdkit":
                    runs[tool].append(
                        kdkit_throughput(
                            cfg, teacher, tokenizer, kd_samples, work=folder, collate=collate, **options
                        )
                    )
                else:
                    student, _ = build_student(cfg, teacher, tokenizer)
                    runs[tool].append(
                        trl_throughput(teacher, student, tokenizer, samples, work=folder, **options)
                    )
        entry: dict[str, Any] = {"runs": runs}
        for tool, measured in runs.items():  # the median round by tokens/s
            entry[tool] = sorted(measured, key=lambda r: r["tokens_per_s"])[len(measured) // 2]
        entry["ratio"] = entry["kdkit"]["tokens_per_s"] / entry["trl"]["tokens_per_s"]
        entry["ratios_per_round"] = [
            a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["kdkit"], runs["trl"])
        ]
        results[label] = entry
        ours, theirs = entry["kdkit"], entry["trl"]
        print(
            f"{label}: kdkit {ours['tokens_per_s']:.0f} tok/s (gen {ours['generation_share']:.0%}), "
            f"TRL {theirs['tokens_per_s']:.0f} tok/s (gen {theirs['generation_share']:.0%}), "
            f"median ratio {entry['ratio']:.2f}x, per round "
            + ", ".join(f"{r:.2f}" for r in entry["ratios_per_round"]),
            flush=True,
        )
    return results


# ----------------------------------------------------------------------------- summary + plot


def summarise(policies: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per variant: exact match per length, wall time."""
    variants: dict[str, list[dict]] = {}
    for run in policies["runs"]:
        variants.setdefault(run["variant"], []).append(run)
    rows = []
    for name, runs in variants.items():
        row: dict[str, Any] = {"variant": name, "method": runs[0]["method"], "seeds": len(runs)}
        for length in runs[0]["exact_match"]:
            values = [r["exact_match"][length] for r in runs]
            row[f"em_d{length}"] = (statistics.fmean(values), statistics.pstdev(values))
        walls = [r["wall_s"] for r in runs]
        row["wall_s"] = (statistics.fmean(walls), statistics.pstdev(walls))
        row["generation_share"] = statistics.fmean(r["generation_s"] / r["wall_s"] for r in runs)
        rows.append(row)
    return rows


def render_tables(result: dict[str, Any]) -> str:
    """Markdown tables of a result JSON: policies (mean ± std) and throughput."""
    lines: list[str] = []
    if "summary" in result:
        reference = result["policies"]["reference"]
        lengths = list(reference["teacher"])
        head = "| variant | method | " + " | ".join(f"EM {d}-digit" for d in lengths)
        lines += [
            head + " | wall time (s) | generation share |",
            "|---|---|" + "---:|" * len(lengths) + "---:|---:|",
        ]
        for name in ("teacher", "student_init"):
            cells = " | ".join(f"{reference[name][d]:.1%}" for d in lengths)
            lines.append(f"| {name} | — | {cells} | — | — |")
        for row in result["summary"]:
            cells = " | ".join(f"{row[f'em_d{d}'][0]:.1%} ± {row[f'em_d{d}'][1]:.1%}" for d in lengths)
            wall = f"{row['wall_s'][0]:.0f} ± {row['wall_s'][1]:.0f}"
            lines.append(
                f"| {row['variant']} | {row['method']} | {cells} | {wall} | {row['generation_share']:.0%} |"
            )
        lines.append("")
    for key in sorted(k for k in result if k.startswith("throughput") and not k.endswith("_settings")):
        batch = result.get(f"{key}_settings", {}).get("batch_size", 16)
        lines += [
            f"`{key}`:",
            "",
            "| policy | batch | tool | completion tokens/s | s/step | generation share | kdkit / TRL (median)"
            " | kdkit / TRL per round |",
            "|---|---:|---|---:|---:|---:|---:|---|",
        ]
        for label, entry in result[key].items():
            for tool in ("kdkit", "trl"):
                r = entry[tool]
                ratio = f"{entry['ratio']:.2f}×" if tool == "kdkit" else ""
                rounds = (
                    ", ".join(f"{x:.2f}" for x in entry.get("ratios_per_round", []))
                    if tool == "kdkit"
                    else ""
                )
                lines.append(
                    f"| {label} | {batch} | {tool} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.3f} | "
                    f"{r['generation_share']:.0%} | {ratio} | {rounds} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], reference: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for row in rows:
        lengths = sorted(int(k[4:]) for k in row if k.startswith("em_d"))
        means = [row[f"em_d{d}"][0] for d in lengths]
        stds = [row[f"em_d{d}"][1] for d in lengths]
        ax.errorbar(lengths, means, yerr=stds, marker="o", capsize=3, label=row["variant"])
    teacher = reference["teacher"]
    ax.plot([int(d) for d in teacher], list(teacher.values()), "k--", label="teacher")
    ax.set_xticks([int(d) for d in teacher])
    ax.set_xlabel("operand digits")
    ax.set_ylabel("exact match (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Exact match by problem length (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per policy variant")
    parser.add_argument("--throughput-steps", type=int, default=None)
    parser.add_argument("--skip-policies", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="alternating kdkit/TRL throughput rounds")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="throughput batch size; other than 16 the result is stored as throughput_b<N> beside the main",
    )
    parser.add_argument(
        "--throughput-models",
        choices=("arithmetic", "smollm2"),
        default="arithmetic",
        help="smollm2: throughput only, SmolLM2-135M teacher and derived student (batch 4, 32 new tokens)",
    )
    parser.add_argument("--render", type=Path, help="print the Markdown tables of a result JSON and exit")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(render_tables(json.loads(args.render.read_text())))
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    quick = args.quick
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    overrides = [] if args.steps is None and not quick else [f"train.steps={args.steps or 10}"]
    if quick:
        overrides += ["eval.exact_match_problems=80", "data.train_size=2000"]
    cfg = load_run_config(RECIPE, overrides)
    cfg.train.progress = False
    tp_steps = args.throughput_steps or (4 if quick else 20)
    tp_warmup = 2 if quick else 3
    smollm2 = args.throughput_models == "smollm2"
    if smollm2:
        # a step takes seconds here, not milliseconds: one warm-up step and a few timed ones suffice
        args.skip_policies = True
        cfg = load_run_config(SMOLLM2_RECIPE)
        tp_steps = args.throughput_steps or (1 if quick else 3)
        tp_warmup = 1
    batch_size = args.batch_size if args.batch_size != 16 or not smollm2 else 4
    max_new_tokens = 32 if smollm2 else 48

    started = time.perf_counter()
    result: dict[str, Any] = {
        "quick": quick,
        "seeds": seeds,
        "steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        "threads": args.threads,
        "machine": {
            "cpu_count": __import__("os").cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "load_average_start": list(__import__("os").getloadavg()),
        },
        "recipe": str(RECIPE.relative_to(ROOT)),
    }
    with tempfile.TemporaryDirectory(prefix="kdkit-lm-policies-") as tmp:
        work = Path(tmp)
        if not args.skip_policies:
            policies = policy_runs(cfg, seeds, work / "policies")
            result["policies"] = policies
            result["summary"] = summarise(policies)
        if not args.skip_throughput:
            repeats = args.repeats or (1 if quick else 3 if not smollm2 else 2)
            if smollm2:
                key = "throughput_smollm2" + ("" if args.threads == 1 else f"_t{args.threads}")
            else:
                key = "throughput" if batch_size == 16 else f"throughput_b{batch_size}"
            load_start = list(__import__("os").getloadavg())
            result[key] = throughput(
                cfg,
                steps=tp_steps,
                warmup=tp_warmup,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                work=work / "tp",
                repeats=repeats,
                task=args.throughput_models,
            )
            result[f"{key}_settings"] = {
                "models": args.throughput_models,
                "steps": tp_steps,
                "warmup": tp_warmup,
                "batch_size": batch_size,
                "max_new_tokens": max_new_tokens,
                "prompt_tokens": 32 if smollm2 else None,
                "sampling_temperature": 1.0,
                "repeats": repeats,
                "threads": args.threads,
                "load_average_start": load_start,
                "load_average_end": list(__import__("os").getloadavg()),
                "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
    result["total_s"] = time.perf_counter() - started
    result["load_average_end"] = list(__import__("os").getloadavg())
    suffix = "_quick" if quick else ""
    OUT.mkdir(parents=True, exist_ok=True)
    previous_file = OUT / f"lm_policies{suffix}.json"
    if previous_file.is_file() and (args.skip_policies or args.skip_throughput):
        # a partial rerun keeps the other part's results (and says when each part ran)
        previous = json.loads(previous_file.read_text())
        for key, value in previous.items():
            if key.startswith(("policies", "summary", "throughput")) and key not in result:
                result[key] = value
            if args.skip_policies and key in ("seeds", "steps", "batch_size"):
                result[key] = value  # these describe the policies part, which this run kept
        result["previous_run"] = {k: previous.get(k) for k in ("machine", "total_s", "load_average_end")}
    (OUT / f"lm_policies{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    if "summary" in result:
        plot(result["summary"], result["policies"]["reference"], OUT / f"lm_policies{suffix}.png")
    print(f"total {result['total_s']:.0f} s; wrote {OUT / f'lm_policies{suffix}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
