"""On-policy sampling speed: kdkit's decoders vs Hugging Face `generate`, and generation's share of a step.

On the arithmetic task's models (the cached teacher, 3 layers of width 64, and the student of
recipes/arithmetic-policies.yaml: the same layers with quarter-width MLPs), side by side in one
process, rounds alternating the order of the methods (seed r for every method of round r):

1. tokens/s of three samplers on the same prompts, batch and max_new_tokens: `model.generate`
   (do_sample, the same temperature, top_k=0, top_p=1); `kdkit.samplers.generation.sample_tokens`
   with `fast=False` (kdkit's generic loop over the model's own forward: KV cache, finished rows
   dropped); and `sample_tokens` as it runs by default (`kdkit.samplers.fast_decode.LeanDecoder`:
   static cache, fused matmuls, the same logits). Completion tokens = generated tokens up to and
   including the first EOS.
2. G samples per prompt: `num_samples=G` (one prefill per prompt) vs `generate(num_return_sequences=G)`.
3. The share of an on-policy step spent sampling: sample the student's completions, teacher and
   student forward, reverse KL on the completion tokens, backward, AdamW step; once per sampler.
4. `--smollm2`: tokens/s of the three samplers for the SmolLM2-135M-Instruct -> every-third-layer
   student of recipes/smollm2-python-docs-cpu.yaml on 16-token Python-docs prompts, and the
   on-policy step share with that teacher.

    .venv/bin/python benchmarks/sampling.py --rounds 4 --smollm2   # -> docs/benchmarks/sampling.json
    .venv/bin/python benchmarks/sampling.py --quick                # smoke run -> runs/benchmarks/
    .venv/bin/python benchmarks/sampling.py --ops-only             # ops and ms of one decode step
    .venv/bin/python benchmarks/sampling.py --rounds 4 --compiled  # + kdkit_compiled (compile_decode)

`--compiled` adds `kdkit_compiled` to parts 1-3: `sample_tokens(compile_decode=True)`, the
fixed-shape step and the token draw through torch.compile; its compile runs once before the timed
rounds and is reported apart (`compile_s`).

`--device cuda` (or `--device cpu` to check the same code paths here; `--quick` shrinks it) runs
the device suite instead, which adds the lean decoder's fixed-shape step captured in a CUDA graph
(`kdkit_graph`: `sample_tokens(graph_decode=True)`; on a CPU the same fixed-shape step runs
eagerly, no graph) next to the dynamic lean step (`kdkit_lean`: `graph_decode=False`):

5. the arithmetic student (float32): tokens/s of HF generate, kdkit generic, lean and graph with 32
   prompts x 1 sample and 8 prompts x G = 4 (3 rounds, order alternating, per-round ratios),
   one sampling call with its decoder (and graph) built for it vs kept from the previous call
   (`kept_vs_fresh`), and sampling's share of the on-policy reverse-KL step with generate, lean
   and graph: 6 steps each on one student and one AdamW optimizer, a new prompt batch per step, with
   the fixed-shape decoder cache's hits / misses / rebuilds (`steps.decoder_cache`);
6. SmolLM2-135M's shape (random weights from `$KDKIT_CACHE/models/SmolLM2-135M-Instruct/config.json`,
   bfloat16, 8 random 16-token prompts, 32 new tokens): tokens/s of generate, lean and graph.

    python benchmarks/sampling.py --device cuda --out DIR   # -> DIR/sampling_cuda.json (~1 min, H200)
    python benchmarks/sampling.py --device cpu --quick --out /tmp/s  # every code path, tiny sizes
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kdkit.losses import DIVERGENCES
from kdkit.models.lm import derive_student
from kdkit.pipelines.teachers import get_arithmetic_teacher
from kdkit.samplers import PromptCompletionCollator
from kdkit.samplers.collate import build_lm_batch
from kdkit.samplers.fast_decode import clear_decoder_cache, decoder_cache_info
from kdkit.samplers.generation import (
    GenerationSettings,
    completion_lengths,
    eos_token_ids,
    generate_batch,
    sample_tokens,
)
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


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], torch.Tensor], eos: int) -> tuple[float, int]:
    """Wall seconds of fn() (device work included) and its completion tokens."""
    synchronize(DEVICE)
    start = time.perf_counter()
    new = fn()
    synchronize(DEVICE)
    seconds = time.perf_counter() - start
    return seconds, int(completion_lengths(new, eos).sum())


DEVICE = torch.device("cpu")  # the device suite sets it (timed() waits for its queued work)


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


SAMPLERS = ("hf_generate", "kdkit_generic", "kdkit_lean")
# kdkit's decoders: name -> (fast_decode, graph_decode, compile_decode). The CPU suite's "kdkit_lean"
# is the default path there (graph_decode None = the dynamic step off CUDA); the device suite names
# both explicitly. "kdkit_compiled": the fixed-shape step through torch.compile (`--compiled`).
KDKIT_DECODERS: dict[str, tuple[bool, bool | None, bool]] = {
    "kdkit_generic": (False, None, False),
    "kdkit_lean": (True, None, False),
    "kdkit_lean_eager": (True, False, False),
    "kdkit_graph": (True, True, False),
    "kdkit_compiled": (True, True, True),
}


def kdkit_sample(
    model,
    ids,
    mask,
    n: int,
    eos: int,
    pad: int,
    fast: bool,
    g: int = 1,
    graph_decode: bool | None = None,
    compile_decode: bool = False,
) -> torch.Tensor:
    return sample_tokens(
        model,
        ids,
        mask,
        max_new_tokens=n,
        eos_token_ids=(eos,),
        pad_token_id=pad,
        num_samples=g,
        fast=fast,
        graph_decode=graph_decode,
        compile_decode=compile_decode,
    )


def sampler_runs(
    model, ids, mask, n: int, eos: int, pad: int, g: int = 1, names: tuple[str, ...] = SAMPLERS
) -> dict[str, Callable]:
    """The samplers `names` as timed callables (seconds, completion tokens)."""

    def run(name: str) -> Callable[[], tuple[float, int]]:
        if name == "hf_generate":
            return lambda: timed(lambda: hf_generate(model, ids, mask, n, eos, pad, g), eos)
        fast, graph, compiled = KDKIT_DECODERS[name]
        return lambda: timed(
            lambda: kdkit_sample(model, ids, mask, n, eos, pad, fast, g, graph, compiled), eos
        )

    return {name: run(name) for name in names}


def on_policy_step(student, teacher, optimizer, prompts, settings, sampler: str) -> dict[str, float]:
    """One on-policy reverse-KL step; returns its wall seconds and the sampling seconds within it."""
    synchronize(DEVICE)
    started = time.perf_counter()
    ids, mask = prompts["prompt_ids"], prompts["prompt_attention_mask"]
    if sampler != "hf_generate":
        fast, graph, compiled = KDKIT_DECODERS[sampler]
        choice = replace(settings, fast_decode=fast, graph_decode=graph, compile_decode=compiled)
        batch, info = generate_batch(student, ids, mask, choice)
        sampling = info["generation_s"]
    else:  # the same batch layout, sampled by HF generate
        t0 = time.perf_counter()
        student.eval()
        with torch.no_grad():
            new = hf_generate(
                student, ids, mask, settings.max_new_tokens, settings.eos_token_id, settings.pad_token_id
            )
        student.train()
        synchronize(DEVICE)
        sampling = time.perf_counter() - t0
        lengths = completion_lengths(new, settings.eos_token_id)
        batch = build_lm_batch(
            [row[m.bool()].tolist() for row, m in zip(ids, mask)],
            [row[: int(n)].tolist() for row, n in zip(new, lengths)],
            settings.pad_token_id,
        )
        batch = {k: v.to(ids.device) for k, v in batch.items()}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1]
    logits = student(**inputs).logits[:, :-1]
    mask_t = batch["labels"][:, 1:] != -100
    loss = DIVERGENCES.get("rkl")(logits, t_logits, mask=mask_t)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(DEVICE)
    tokens = float(mask_t.sum())
    return {"step_s": time.perf_counter() - started, "sampling_s": sampling, "tokens": tokens}


CACHE_COUNTS = ("hits", "misses", "rebuilds")


def step_rounds(
    student, teacher, prompts, settings, n: int, seed: int, names: tuple[str, ...] = SAMPLERS
) -> dict[str, list[dict[str, float]]]:
    """On-policy steps with each sampler, order alternating per round, after one warm-up step each,
    all on the same student and AdamW optimizer (as training runs them: the fixed-shape decoder and
    its graph are kept across steps while the optimizer updates the weights in place). prompts: one
    batch, or a list of batches taken in turn, round r using batch r (prompt widths vary as in
    training). Each step records the decoder cache's hits / misses / rebuilds during it."""
    batches = prompts if isinstance(prompts, list) else [prompts]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    steps: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    for name in names:
        on_policy_step(student, teacher, optimizer, batches[0], settings, name)
    for r in range(n):
        order = list(names) if r % 2 == 0 else list(names)[::-1]
        for name in order:
            torch.manual_seed(seed + r)
            before = decoder_cache_info()
            step = on_policy_step(student, teacher, optimizer, batches[r % len(batches)], settings, name)
            after = decoder_cache_info()
            steps[name].append({**step, **{k: after[k] - before[k] for k in CACHE_COUNTS}})
    return steps


def ratios(part: dict[str, dict[str, list]], method: str, base: str = "hf_generate") -> list[float]:
    """Per-round tokens/s of `method` divided by `base`'s."""
    m, b = part[method], part[base]
    return [
        (tm / sm) / (tb / sb) for tm, sm, tb, sb in zip(m["tokens"], m["seconds"], b["tokens"], b["seconds"])
    ]


def step_summary(steps: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    return {
        "share": {k: statistics.median(s["sampling_s"] / s["step_s"] for s in v) for k, v in steps.items()},
        "share_min_max": {
            k: [min(s["sampling_s"] / s["step_s"] for s in v), max(s["sampling_s"] / s["step_s"] for s in v)]
            for k, v in steps.items()
        },
        "step_s": {k: statistics.median(s["step_s"] for s in v) for k, v in steps.items()},
        "sampling_s": {k: statistics.median(s["sampling_s"] for s in v) for k, v in steps.items()},
        "step_tokens_per_s": {
            k: statistics.median(s["tokens"] / s["step_s"] for s in v) for k, v in steps.items()
        },
        # the fixed-shape decoder cache over the measured steps (hits: decoder and graph reused)
        "decoder_cache": {
            k: {c: sum(s.get(c, 0) for s in v) for c in CACHE_COUNTS} for k, v in steps.items()
        },
    }


def part_summary(part: dict[str, dict[str, list]]) -> dict[str, Any]:
    return {
        "tokens_per_s": {k: summary(v["seconds"], v["tokens"]) for k, v in part.items()},
        "lean_over_hf_per_round": ratios(part, "kdkit_lean"),
        "generic_over_hf_per_round": ratios(part, "kdkit_generic"),
        "lean_over_generic_per_round": ratios(part, "kdkit_lean", "kdkit_generic"),
        **(
            {"compiled_over_hf_per_round": ratios(part, "kdkit_compiled")} if "kdkit_compiled" in part else {}
        ),
    }


def ops_per_decode_step(model, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Tensor ops (torch.profiler's aten:: events, views included) and wall ms of one decode step of
    a 32-row batch: the model's own forward on its dynamic cache vs `LeanDecoder.step`."""
    from torch.profiler import profile

    from kdkit.samplers.fast_decode import LeanDecoder

    def count(step: Callable[[], Any]) -> dict[str, float]:
        for _ in range(3):
            step()
        with profile() as prof:
            step()
        ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        times = []
        for _ in range(20):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return {"aten_ops": ops, "ms_median": statistics.median(times), "ms_min": min(times)}

    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        token = out.logits[:, -1].argmax(-1)[:, None]
        grown = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        after = positions[:, -1:] + 1

        def hf_step() -> None:  # the same position each time: the cache is cut back after the step
            model(input_ids=token, attention_mask=grown, position_ids=after, cache=cache, use_cache=True)
            cache.crop(-1)

        decoder = LeanDecoder(model)
        decoder.prefill(ids, mask, 48)

        def lean_step() -> None:
            decoder.step(token[:, 0])
            decoder.step_index -= 1  # write the same cache slot again
            decoder.next_pos -= 1

        return {"hf_forward": count(hf_step), "lean": count(lean_step)}


def smollm2_part(args: argparse.Namespace) -> dict[str, Any]:
    """The three samplers and the on-policy step share at SmolLM2-135M size (teacher -> 11 layers)."""
    from kdkit.config import load_run_config
    from kdkit.data.python_docs import load_python_docs
    from kdkit.pipelines.lm import build_student, load_teacher

    cfg = load_run_config(ROOT / "recipes" / "smollm2-python-docs-cpu.yaml")
    teacher, tokenizer = load_teacher(cfg, log=lambda _: None)
    student, _ = build_student(cfg, teacher, tokenizer)
    student.eval()
    blocks = load_python_docs(tokenizer, "train", block_size=16, max_tokens=16 * (args.smollm2_batch + 1))
    ids = torch.stack([blocks[i]["input_ids"] for i in range(args.smollm2_batch)])
    mask = torch.ones_like(ids)
    eos, pad = int(eos_token_ids(student)[0]), int(tokenizer.pad_token_id)
    n = args.smollm2_new_tokens
    with torch.no_grad():
        part = rounds(sampler_runs(student, ids, mask, n, eos, pad), args.smollm2_rounds, args.seed)
    settings = GenerationSettings(temperature=1.0, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
    student.train()
    steps = step_rounds(
        student,
        teacher,
        {"prompt_ids": ids, "prompt_attention_mask": mask},
        settings,
        args.smollm2_rounds,
        args.seed,
    )
    return {
        "teacher_layers": teacher.config.num_hidden_layers,
        "student_layers": student.config.num_hidden_layers,
        "student_params": sum(p.numel() for p in student.parameters()),
        "batch": args.smollm2_batch,
        "prompt_tokens": 16,
        "max_new_tokens": n,
        "rounds": args.smollm2_rounds,
        "tokens": part,
        "steps": steps,
        "summary": {**part_summary(part), **step_summary(steps)},
    }


def summary(seconds: list[float], tokens: list[int]) -> dict[str, float]:
    rates = [t / s for t, s in zip(tokens, seconds)]
    return {"tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}


DEVICE_SAMPLERS = ("hf_generate", "kdkit_generic", "kdkit_lean_eager", "kdkit_graph")
STEP_SAMPLERS = ("hf_generate", "kdkit_lean_eager", "kdkit_graph")
SMOLLM2_SAMPLERS = ("hf_generate", "kdkit_lean_eager", "kdkit_graph")


def guarded(name: str, fn: Callable[[], Any], errors: dict[str, str]) -> Any:
    """fn(), or None with its error recorded under `name` (one failing case never ends the run)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - recorded in the JSON, the run goes on
        errors[name] = f"{type(error).__name__}: {error}"
        print(f"  {name} FAILED: {errors[name]}", flush=True)
        return None


def device_rounds(methods: dict[str, Callable], n: int, seed: int, errors: dict[str, str], tag: str):
    """One unmeasured warm-up call per method (CUDA/cuBLAS initialisation, first captures), then
    `rounds`; a method that fails is recorded in `errors` and left out."""
    working = {}
    for name, fn in methods.items():
        if guarded(f"{tag}/{name}", fn, errors) is not None:
            working[name] = fn
    return rounds(working, n, seed)


def ratio_table(part: dict[str, dict[str, list]]) -> dict[str, Any]:
    """Median tokens/s per method and per-round ratios of each kdkit sampler over generate and of
    the graph over the eager lean step (where both ran)."""
    out: dict[str, Any] = {"tokens_per_s": {k: summary(v["seconds"], v["tokens"]) for k, v in part.items()}}
    pairs = [(m, "hf_generate") for m in part if m != "hf_generate"]
    pairs.append(("kdkit_graph", "kdkit_lean_eager"))
    for method, base in pairs:
        if method in part and base in part:
            per_round = ratios(part, method, base)
            out[f"{method}_over_{base}"] = {"per_round": per_round, "median": statistics.median(per_round)}
    return out


def smollm2_random(device: torch.device, quick: bool) -> tuple[Any, int]:
    """SmolLM2-135M-Instruct's architecture with random weights (timings do not depend on the
    values), bfloat16, on `device`; its EOS id. `quick`: 2 of its 30 layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdkit.paths import cache_dir

    folder = cache_dir("models", "SmolLM2-135M-Instruct")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder / 'config.json'} is missing (SmolLM2-135M-Instruct's config)")
    config = AutoConfig.from_pretrained(folder)
    if quick:
        config.num_hidden_layers = 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=torch.bfloat16).eval()
    eos = config.eos_token_id
    return model, int(eos[0] if isinstance(eos, (list, tuple)) else eos)


def decode_step_ms(
    model, ids: torch.Tensor, mask: torch.Tensor, steps: int, repeats: int = 3
) -> dict[str, Any]:
    """Milliseconds per decode step of the whole batch (no rows dropped), `steps` steps after a
    prefill, best of `repeats`: the dynamic lean step, the fixed-shape step run eagerly, and (on
    CUDA) its graph replay, with the capture's own cost (warm-up + capture, ms) and whether the
    graph was captured at all (a failed capture would decode eagerly; its reason is recorded)."""
    from kdkit.samplers.fast_decode import LeanDecoder, StaticStepDecoder

    device = ids.device
    graph = device.type == "cuda"
    out: dict[str, Any] = {"steps": steps}
    kinds = {"lean_dynamic": False, "fixed_eager": False, **({"fixed_graph": True} if graph else {})}
    with torch.no_grad():
        for name, captured in kinds.items():
            best, capture = float("inf"), float("inf")
            for _ in range(repeats):
                decoder = LeanDecoder(model) if name == "lean_dynamic" else StaticStepDecoder(model, captured)
                token = decoder.prefill(ids, mask, steps + 1).argmax(-1)
                synchronize(device)
                start = time.perf_counter()
                token = decoder.step(token).argmax(-1)  # the first step captures the graph
                synchronize(device)
                first = time.perf_counter() - start
                start = time.perf_counter()
                for _ in range(steps - 1):
                    token = decoder.step(token).argmax(-1)
                synchronize(device)
                per_step = (time.perf_counter() - start) / (steps - 1)
                best, capture = min(best, per_step), min(capture, first - per_step)
            out[f"{name}_ms"] = best * 1e3
            if name == "fixed_graph":
                out["graph_capture_ms"] = capture * 1e3
                out["graph_captured"] = decoder.graph is not None
                out["graph_failure"] = decoder.graph_failed
    return out


def kept_vs_fresh_ms(model, ids, mask, n: int, eos: int, pad: int, rounds: int = 4) -> dict[str, Any]:
    """Wall ms of one fixed-shape `sample_tokens` call (greedy, so every call decodes the same
    tokens) with a decoder built for it (on CUDA: warm-up + capture inside the call) and with the
    decoder kept from the previous call, alternating, median of `rounds` each."""
    times: dict[str, list[float]] = {"fresh": [], "kept": []}

    def call() -> float:
        synchronize(ids.device)
        start = time.perf_counter()
        sample_tokens(
            model,
            ids,
            mask,
            temperature=0.0,
            max_new_tokens=n,
            eos_token_ids=(eos,),
            pad_token_id=pad,
            graph_decode=True,
        )
        synchronize(ids.device)
        return time.perf_counter() - start

    call()
    for r in range(rounds):
        for name in ("fresh", "kept") if r % 2 == 0 else ("kept", "fresh"):
            if name == "fresh":
                clear_decoder_cache()
            else:
                call()  # (after a fresh call the shape is kept anyway; this keeps the order honest)
            times[name].append(call())
    out: dict[str, Any] = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}
    out["saved_ms"] = out["fresh_ms"] - out["kept_ms"]
    out["raw_ms"] = {k: [t * 1e3 for t in v] for k, v in times.items()}
    return out


def device_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The device suite (parts 5 and 6 of the module docstring) on `args.device`."""
    global DEVICE
    DEVICE = device = torch.device(args.device)
    started = time.perf_counter()
    out_dir = Path(args.out) if args.out else ROOT / "runs" / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}
    quick = args.quick
    n_rounds = 2 if quick else args.rounds or 3
    step_n = n_rounds if quick else max(n_rounds, 6)  # on-policy steps per sampler (cheap: ~0.1 s each)
    batch, group = (8, 2) if quick else (32, 4)
    n = 8 if quick else args.max_new_tokens

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    result: dict[str, Any] = {
        "command": "python benchmarks/sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}",
        "load_avg_1min": [os.getloadavg()[0]],
        "seed": args.seed,
        "rounds": n_rounds,
        "samplers": {
            "hf_generate": "model.generate(do_sample=True, temperature=1, top_k=0, top_p=1)",
            "kdkit_generic": "sample_tokens(fast=False): kdkit's loop over the model's own forward",
            "kdkit_lean_eager": "sample_tokens(graph_decode=False): LeanDecoder's dynamic step, eager",
            "kdkit_graph": "sample_tokens(graph_decode=True): StaticStepDecoder's fixed-shape step, "
            + ("one CUDA graph replay per token" if device.type == "cuda" else "EAGER (CPUs have no graphs)"),
        },
        "errors": errors,
    }
    progress(f"device suite on {result['device_name']}")
    teacher, tokenizer, folder = get_arithmetic_teacher()
    # both students derived on the CPU from the same teacher weights, then moved
    student = derive_student(teacher, keep_layers=3, intermediate_size=48).to(device).eval()
    train_student = derive_student(teacher, keep_layers=3, intermediate_size=48).to(device).train()
    teacher = teacher.to(device).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    collate = PromptCompletionCollator(tokenizer)
    # a new prompt batch per on-policy step (widths vary a little, as in training); the first also
    # serves the sampler-only parts
    step_prompts = [
        {
            k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in collate(arithmetic_dataset(batch, (1, 3), seed=args.seed + r)).items()
        }
        for r in range(step_n)
    ]
    prompts = step_prompts[0]
    ids, mask = prompts["prompt_ids"], prompts["prompt_attention_mask"]
    result["arithmetic_prompt_widths"] = [int(p["prompt_ids"].shape[1]) for p in step_prompts]
    result["arithmetic"] = {"teacher": str(folder), "batch": batch, "group": group, "max_new_tokens": n}

    progress("ms per decode step (arithmetic student, the whole batch)")
    result["arithmetic"]["decode_step"] = guarded(
        "decode_step", lambda: decode_step_ms(student, ids, mask, n - 1), errors
    )
    progress(f"  {json.dumps(result['arithmetic']['decode_step'])}")
    progress("one sampling call, decoder built for it vs kept from the previous call")
    result["arithmetic"]["kept_vs_fresh"] = guarded(
        "kept_vs_fresh", lambda: kept_vs_fresh_ms(student, ids, mask, n, eos, pad), errors
    )
    if result["arithmetic"]["kept_vs_fresh"] is not None:
        kept = result["arithmetic"]["kept_vs_fresh"]
        progress(f"  fresh {kept['fresh_ms']:.1f} ms, kept {kept['kept_ms']:.1f} ms")
    with torch.no_grad():
        progress(f"arithmetic student: {batch} prompts x 1 sample")
        runs = sampler_runs(student, ids, mask, n, eos, pad, names=DEVICE_SAMPLERS)
        part1 = device_rounds(runs, n_rounds, args.seed, errors, "g1")
        result["arithmetic"]["one_sample"] = {"raw": part1, **ratio_table(part1)}
        progress(f"  {json.dumps(result['arithmetic']['one_sample']['tokens_per_s'])}")
        progress(f"arithmetic student: {batch // group} prompts x G = {group}")
        gids, gmask = ids[: batch // group], mask[: batch // group]
        part2 = device_rounds(
            sampler_runs(student, gids, gmask, n, eos, pad, group, names=DEVICE_SAMPLERS),
            n_rounds,
            args.seed,
            errors,
            f"g{group}",
        )
        result["arithmetic"]["group"] = {"raw": part2, **ratio_table(part2)}
        progress(f"  {json.dumps(result['arithmetic']['group']['tokens_per_s'])}")

    progress("on-policy reverse-KL steps")
    settings = GenerationSettings(temperature=1.0, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
    steps = guarded(
        "steps",
        lambda: step_rounds(train_student, teacher, step_prompts, settings, step_n, args.seed, STEP_SAMPLERS),
        errors,
    )
    if steps is not None:
        result["arithmetic"]["steps"] = {"raw": steps, **step_summary(steps)}
        progress(f"  sampling share {json.dumps(result['arithmetic']['steps']['share'])}")
        progress(f"  decoder cache {json.dumps(result['arithmetic']['steps']['decoder_cache'])}")

    def smollm2() -> dict[str, Any]:
        model, s_eos = smollm2_random(device, quick)
        s_batch, s_new = (2, 4) if quick else (8, 32)
        s_ids = torch.randint(
            100, model.config.vocab_size, (s_batch, 16), generator=torch.Generator().manual_seed(args.seed)
        ).to(device)
        s_mask = torch.ones_like(s_ids)
        step_ms = decode_step_ms(model, s_ids, s_mask, s_new - 1, repeats=2)
        progress(f"  {json.dumps(step_ms)}")
        with torch.no_grad():
            part = device_rounds(
                sampler_runs(model, s_ids, s_mask, s_new, s_eos, s_eos, names=SMOLLM2_SAMPLERS),
                n_rounds,
                args.seed,
                errors,
                "smollm2",
            )
        return {
            "layers": model.config.num_hidden_layers,
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": "bfloat16",
            "batch": s_batch,
            "prompt_tokens": 16,
            "max_new_tokens": s_new,
            "decode_step": step_ms,
            "raw": part,
            **ratio_table(part),
        }

    result["smollm2"] = None
    if device.type == "cuda" or quick or args.smollm2:  # (full size on a CPU: only when asked)
        progress("SmolLM2-135M shape, random weights, bfloat16")
        result["smollm2"] = guarded("smollm2", smollm2, errors)
    if result["smollm2"] is not None:
        progress(f"  {json.dumps(result['smollm2']['tokens_per_s'])}")
    result["load_avg_1min"].append(os.getloadavg()[0])
    result["seconds"] = time.perf_counter() - started
    path = out_dir / f"sampling_{device.type}.json"
    path.write_text(json.dumps(result, indent=1))
    brief = {
        part: {k: v for k, v in result["arithmetic"][part].items() if k != "raw"}
        for part in ("one_sample", "group", "steps", "decode_step", "kept_vs_fresh")
        if result["arithmetic"].get(part)
    }
    if result["smollm2"] is not None:
        brief["smollm2"] = {k: v for k, v in result["smollm2"].items() if k != "raw"}
    print(json.dumps({"summary": brief, "errors": errors}, indent=1), flush=True)
    progress(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (3 in the device suite)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--group", type=int, default=4, help="G samples per prompt in part 2")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--ops-only", action="store_true", help="only count the ops of one decode step")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="add kdkit_compiled: the fixed-shape step through torch.compile (compile_decode=True)",
    )
    parser.add_argument("--smollm2", action="store_true", help="part 4: SmolLM2-135M -> 11-layer student")
    parser.add_argument("--smollm2-batch", type=int, default=8)
    parser.add_argument("--smollm2-new-tokens", type=int, default=32)
    parser.add_argument("--smollm2-rounds", type=int, default=3)
    parser.add_argument(
        "--device", default=None, help="run the device suite (CUDA graphs) on this device: cuda, cpu, auto"
    )
    args = parser.parse_args(argv)
    if args.device is not None:
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(args.threads)
        return device_main(args, argv)
    args.rounds = args.rounds or 5
    if args.quick:
        args.rounds, args.batch, args.smollm2_rounds, args.smollm2_batch = 2, 8, 1, 2
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

    ops = ops_per_decode_step(student, ids, mask)
    print(json.dumps({"ops_per_decode_step": ops}), flush=True)
    if args.ops_only:
        return 0

    names = SAMPLERS + (("kdkit_compiled",) if args.compiled else ())
    compile_s = {}
    if args.compiled:  # compile each shape before timing (reported apart): two calls, as a decoder's
        # first prefill runs eagerly (it allocates the buffers) and later ones compiled
        g = args.group
        for key, (c_ids, c_mask, c_g) in {
            "g1": (ids, mask, 1),
            f"g{g}": (ids[: args.batch // g], mask[: args.batch // g], g),
        }.items():
            t0 = time.perf_counter()
            for _ in range(2):
                kdkit_sample(student, c_ids, c_mask, n, eos, pad, True, c_g, True, True)
            compile_s[key] = time.perf_counter() - t0
        print(json.dumps({"compile_s": compile_s}), flush=True)
    # 1. tokens/s, one sample per prompt
    with torch.no_grad():
        part1 = rounds(sampler_runs(student, ids, mask, n, eos, pad, names=names), args.rounds, args.seed)
        # 2. G samples per prompt from batch/G prompts
        g = args.group
        gids, gmask = ids[: args.batch // g], mask[: args.batch // g]
        part2 = rounds(
            sampler_runs(student, gids, gmask, n, eos, pad, g, names=names), args.rounds, args.seed
        )

    # 3. generation's share of an on-policy step
    settings = GenerationSettings(temperature=1.0, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
    train_student = derive_student(teacher, keep_layers=3, intermediate_size=48).train()
    steps = step_rounds(train_student, teacher, prompts, settings, args.rounds, args.seed, names)
    load_mid = os.getloadavg()[0]
    smollm2 = smollm2_part(args) if args.smollm2 else None

    result: dict[str, Any] = {
        "command": "python benchmarks/sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}",
        "threads": args.threads,
        "load_avg_1min": [load0, load_mid, os.getloadavg()[0]],
        "minutes": (time.perf_counter() - started) / 60,
        "teacher": str(folder),
        "student_params": sum(p.numel() for p in student.parameters()),
        "batch": args.batch,
        "group": args.group,
        "max_new_tokens": n,
        "rounds": args.rounds,
        "seed": args.seed,
        "part1": part1,
        "part2": part2,
        "steps": steps,
        "compile_s": compile_s,
        "smollm2": smollm2,
        "ops_per_decode_step": ops,
    }
    result["summary"] = {
        "part1": part_summary(part1),
        "part2": part_summary(part2),
        **step_summary(steps),
        "smollm2": smollm2["summary"] if smollm2 else None,
    }
    (out_dir / "sampling.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
