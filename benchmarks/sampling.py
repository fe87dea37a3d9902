"""On-policy sampling speed: kdkit's decode loop vs Hugging Face `generate`, and generation's share of a step.

On the arithmetic task's models (the cached teacher, 3 layers of width 64, and the student of
recipes/arithmetic-policies.yaml: the same layers with quarter-width MLPs), side by side in one
process, rounds alternating the order of the methods:

1. tokens/s: `kdkit.samplers.generation.sample_tokens` (KV cache, finished rows dropped, kdkit's
   settings only) vs `model.generate` (do_sample, the same temperature, top_k=0, top_p=1) on the
   same prompts, batch and max_new_tokens. Completion tokens = generated tokens up to and including
   the first EOS.
2. G samples per prompt: kdkit `num_samples=G` (one prefill per prompt, cache repeated) vs
   `generate(num_return_sequences=G)`.
3. The share of an on-policy step spent sampling: sample the student's completions, teacher and
   student forward, reverse KL on the completion tokens, backward, AdamW step; once with each
   sampler.

    .venv/bin/python benchmarks/sampling.py            # -> docs/benchmarks/sampling.md / .json (~3 min)
    .venv/bin/python benchmarks/sampling.py --quick    # smoke run -> runs/benchmarks/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdkit.losses import DIVERGENCES
from kdkit.models.lm import derive_student
from kdkit.pipelines.teachers import get_arithmetic_teacher
from kdkit.samplers import PromptCompletionCollator
from kdkit.samplers.generation import GenerationSettings, completion_lengths, generate_batch, sample_tokens
from kdkit.tasks.arithmetic import arithmetic_dataset

ROOT = Path(__file__).resolve().parents[1]


def hf_generate(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new: int, eos: int, pad: int, g: int = 1
):
    """HF generate with plain sampling at temperature 1 (top_k 0, top_p 1): new tokens [B·g, N]."""
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new,
        eos_token_id=eos,
        pad_token_id=pad,
        num_return_sequences=g,
    )
    return out[:, ids.shape[1] :]


def timed(fn: Callable[[], torch.Tensor], eos: int) -> tuple[float, int]:
    start = time.perf_counter()
    new = fn()
    seconds = time.perf_counter() - start
    return seconds, int(completion_lengths(new, eos).sum())


def rounds(
    methods: dict[str, Callable[[], tuple[float, int]]], n: int, seed: int
) -> dict[str, dict[str, list]]:
    """Run every method once per round (order reversed every other round); seconds and tokens."""
    out: dict[str, dict[str, list]] = {k: {"seconds": [], "tokens": []} for k in methods}
    for r in range(n):
        order = list(methods) if r % 2 == 0 else list(methods)[::-1]
        for name in order:
            torch.manual_seed(seed + r)
            seconds, tokens = methods[name]()
            out[name]["seconds"].append(seconds)
            out[name]["tokens"].append(tokens)
    return out


def on_policy_step(student, teacher, optimizer, prompts, settings, sampler: str) -> dict[str, float]:
    """One on-policy reverse-KL step; returns its wall seconds and the sampling seconds within it."""
    started = time.perf_counter()
    ids, mask = prompts["prompt_ids"], prompts["prompt_attention_mask"]
    if sampler == "kdkit":
        batch, info = generate_batch(student, ids, mask, settings)
        sampling = info["generation_s"]
    else:  # the same batch layout, sampled by HF generate
        t0 = time.perf_counter()
        student.eval()
        with torch.no_grad():
            new = hf_generate(student, ids, mask, settings.max_new_tokens, settings.eos_token_id, 0)
        student.train()
        sampling = time.perf_counter() - t0
        from kdkit.samplers import build_lm_batch

        lengths = completion_lengths(new, settings.eos_token_id)
        batch = build_lm_batch(
            [row[m.bool()].tolist() for row, m in zip(ids, mask)],
            [row[: int(n)].tolist() for row, n in zip(new, lengths)],
            0,
        )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1]
    logits = student(**inputs).logits[:, :-1]
    mask_t = batch["labels"][:, 1:] != -100
    loss = DIVERGENCES.get("rkl")(logits, t_logits, mask=mask_t)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step_s": time.perf_counter() - started, "sampling_s": sampling, "tokens": float(mask_t.sum())}


def summary(seconds: list[float], tokens: list[int]) -> dict[str, float]:
    rates = [t / s for t, s in zip(tokens, seconds)]
    return {"tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--group", type=int, default=4, help="G samples per prompt in part 2")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batch = 2, 8
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out) if args.out else ROOT / ("runs/benchmarks" if args.quick else "docs/benchmarks")
    out_dir.mkdir(parents=True, exist_ok=True)

    teacher, tokenizer, folder = get_arithmetic_teacher()
    student = derive_student(teacher, keep_layers=3, intermediate_size=48).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    collate = PromptCompletionCollator(tokenizer)
    prompts = collate(arithmetic_dataset(args.batch, (1, 3), seed=args.seed))
    ids, mask = prompts["prompt_ids"], prompts["prompt_attention_mask"]
    n = args.max_new_tokens
    started = time.perf_counter()
    load0 = os.getloadavg()[0]

    # 1. tokens/s, one sample per prompt
    with torch.no_grad():
        part1 = rounds(
            {
                "hf_generate": lambda: timed(lambda: hf_generate(student, ids, mask, n, eos, pad), eos),
                "kdkit": lambda: timed(
                    lambda: sample_tokens(
                        student, ids, mask, max_new_tokens=n, eos_token_ids=(eos,), pad_token_id=pad
                    ),
                    eos,
                ),
            },
            args.rounds,
            args.seed,
        )
        # 2. G samples per prompt from batch/G prompts
        g = args.group
        gids, gmask = ids[: args.batch // g], mask[: args.batch // g]
        part2 = rounds(
            {
                "hf_generate": lambda: timed(lambda: hf_generate(student, gids, gmask, n, eos, pad, g), eos),
                "kdkit": lambda: timed(
                    lambda: sample_tokens(
                        student,
                        gids,
                        gmask,
                        max_new_tokens=n,
                        eos_token_ids=(eos,),
                        pad_token_id=pad,
                        num_samples=g,
                    ),
                    eos,
                ),
            },
            args.rounds,
            args.seed,
        )

    # 3. generation's share of an on-policy step
    settings = GenerationSettings(temperature=1.0, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
    train_student = derive_student(teacher, keep_layers=3, intermediate_size=48).train()
    optimizer = torch.optim.AdamW(train_student.parameters(), lr=1e-4)
    steps: dict[str, list[dict[str, float]]] = {"hf_generate": [], "kdkit": []}
    on_policy_step(train_student, teacher, optimizer, prompts, settings, "kdkit")  # warm-up
    for r in range(args.rounds):
        order = ["hf_generate", "kdkit"] if r % 2 == 0 else ["kdkit", "hf_generate"]
        for name in order:
            torch.manual_seed(args.seed + r)
            steps[name].append(on_policy_step(train_student, teacher, optimizer, prompts, settings, name))

    result: dict[str, Any] = {
        "command": "python benchmarks/sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}",
        "threads": args.threads,
        "load_avg_1min": [load0, os.getloadavg()[0]],
        "minutes": (time.perf_counter() - started) / 60,
        "teacher": str(folder),
        "student_params": sum(p.numel() for p in student.parameters()),
        "batch": args.batch,
        "group": args.group,
        "max_new_tokens": n,
        "rounds": args.rounds,
        "part1": part1,
        "part2": part2,
        "steps": steps,
    }
    result["summary"] = {
        "part1": {k: summary(v["seconds"], v["tokens"]) for k, v in part1.items()},
        "part2": {k: summary(v["seconds"], v["tokens"]) for k, v in part2.items()},
        "part1_speedup_per_round": [
            (tk / sk) / (th / sh)
            for tk, sk, th, sh in zip(
                part1["kdkit"]["tokens"],
                part1["kdkit"]["seconds"],
                part1["hf_generate"]["tokens"],
                part1["hf_generate"]["seconds"],
            )
        ],
        "part2_speedup_per_round": [
            (tk / sk) / (th / sh)
            for tk, sk, th, sh in zip(
                part2["kdkit"]["tokens"],
                part2["kdkit"]["seconds"],
                part2["hf_generate"]["tokens"],
                part2["hf_generate"]["seconds"],
            )
        ],
        "share": {k: statistics.median(s["sampling_s"] / s["step_s"] for s in v) for k, v in steps.items()},
        "step_s": {k: statistics.median(s["step_s"] for s in v) for k, v in steps.items()},
        "step_tokens_per_s": {
            k: statistics.median(s["tokens"] / s["step_s"] for s in v) for k, v in steps.items()
        },
    }
    (out_dir / "sampling.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
