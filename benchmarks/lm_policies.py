"""LM distillation policies on arithmetic, and kdkit's training throughput against TRL's DistillationTrainer.

Part 1 (policies): the cached arithmetic teacher distilled into a 2-layer student by scratch (CE, no
teacher), off-policy forward KL, on-policy reverse KL, on-policy JSD(0.5) and GKD (λ=0.5) at equal
optimizer steps, over several seeds: exact match by operand length (mean ± std), wall time.
The students train on shorter problems than they are tested on, so exposure bias shows.

Part 2 (throughput): kdkit's `LMDistiller` and TRL 1.16's stable `DistillationTrainer` on identical
models, token ids, batch size, max_new_tokens, sampling temperature, JSD β=0.5, optimizer (fused AdamW,
lr 1e-4 constant, no weight decay, gradient norm 1) and precision (float32, CPU or GPU), off-policy (λ=0:
the dataset's completions) and on-policy (λ=1: the student samples every batch), run in one
process in an order that rotates every round: completion tokens per second after untimed warm-up
steps, per-round ratios, and generation's share of the step. kdkit runs as `kdkit` (the gkd recipe,
loss on the logits of the trained positions), `kdkit_fused` (`fused: true`, hidden states
projected in chunks like TRL's tiled loss) and, off-policy, `kdkit_cache` (the teacher read from a
top-8+tail logit cache built once before the rounds, against TRL's live teacher).

    .venv/bin/python benchmarks/lm_policies.py            # policies + throughput, ~25 min on 2 shared cores
    .venv/bin/python benchmarks/lm_policies.py --skip-policies --repeats 5 --throughput-steps 30
    .venv/bin/python benchmarks/lm_policies.py --throughput-models smollm2 --repeats 2   # ~15-30 min
    .venv/bin/python benchmarks/lm_policies.py --quick    # smoke run, ~2 min

`--throughput-models smollm2` runs part 2 only, at a realistic size: the SmolLM2-135M-Instruct teacher,
a student derived from every third layer (recipes/smollm2-python-docs-cpu.yaml), Python-docs prompts
(32 tokens, 32 completion tokens) rendered through SmolLM2's own chat template. `--modes on_policy`
remeasures one mode and keeps the other's stored result. Results are stored as
`vs_distillation_trainer_<models>_b<batch>` in lm_policies.json.

Writes docs/benchmarks/lm_policies[_quick].json and .png; the Markdown document is written from the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
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

#: The tools of a throughput round: kdkit's default (full logits), kdkit with the fused chunked loss
#: (`fused: true`, hidden states projected in token chunks, like TRL's tiled loss), kdkit reading a
#: top-8+tail logit cache (off-policy only: the teacher does not run), kdkit sampling through the
#: compiled decode step (`compile_decode: true`, on-policy only: it changes nothing else), and TRL's
#: DistillationTrainer.
KDKIT_VARIANTS = ("kdkit", "kdkit_fused", "kdkit_cache", "kdkit_compiled")
OFF_POLICY_ONLY, ON_POLICY_ONLY = ("kdkit_cache",), ("kdkit_compiled",)
TRL = "trl_distillation"
#: lm_policies.json keys of the throughput results (suffixed with the models, batch and threads)
THROUGHPUT_KEY = "vs_distillation_trainer"


def choose_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu". "cpu" hides GPUs from this process
    (before CUDA starts), since kdkit's engine and TRL's Trainer both take a GPU when they see one."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return "cuda" if available else "cpu"


def choose_precision(precision: str, device: str) -> str:
    """"auto" -> "fp32" on every device: the one precision in which both tools do the same arithmetic.

    "bf16" sets kdkit's `mixed_precision: bf16` and TRL's `bf16=True`, which both ask Accelerate to
    wrap each prepared model's `forward` in `torch.autocast(bfloat16)` over float32 weights. kdkit's
    engine calls that wrapped forward (the teacher, the sampler and the loss run inside it), so its
    matmuls run in bf16. TRL 1.16's DistillationTrainer does not: its loss reaches the student's and
    the teacher's backbones through `_forward_redirection`, which swaps the instance's `forward` (the
    autocast wrapper) for the backbone call, so its teacher and student forward passes, the chunked
    loss and the backward run in float32 even with `bf16=True` (only `generate`, which calls the
    wrapped forward, samples under autocast). Checked with a forward hook on every nn.Linear:
    float32 outputs, autocast off, in TRL's training step; bfloat16 in kdkit's. So with "bf16" the
    two tools would not compute in the same precision; "fp32" (no autocast, no TF32: torch's
    defaults, which neither tool changes) is the like-for-like setting.
    """
    if precision == "auto":
        return "fp32"
    return precision


def sync(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock stamp covers it (nothing to do on a CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def random_smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct built from its config.json with random weights (seed 0), and its tokenizer.

    For machines where only the config and tokenizer files of `kdkit.models.smollm2.converted_dir()`
    are present (the weights do not travel): step times do not depend on the weight values.
    """
    from transformers import AutoConfig, AutoTokenizer

    from kdkit.models.lm import build_causal_lm, ensure_pad_token
    from kdkit.models.smollm2 import converted_dir

    folder = converted_dir()
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--random-weights needs SmolLM2's config.json and tokenizer files in {folder}")
    model = build_causal_lm(AutoConfig.from_pretrained(str(folder)), seed=0).float().eval()
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(str(folder)))
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def benchmark_teacher(cfg: LMRunConfig, *, random_weights: bool, device: str) -> tuple[Any, Any]:
    """The recipe's teacher on `device` (float32): loaded, or for SmolLM2 with `random_weights`
    built from its config. (The arithmetic teacher is always the trained one; with
    `random_weights`, only from the cache: training it would not fit a timed run.)"""
    if random_weights and cfg.teacher.source == "smollm2":
        teacher, tokenizer = random_smollm2()
    elif random_weights and cfg.teacher.source == "arithmetic":
        # a machine without the weights must not train the teacher inside a timed run either
        from kdkit.config.lm import ArithmeticTeacherConfig
        from kdkit.paths import cache_dir
        from kdkit.pipelines.teachers import arithmetic_teacher_key

        key = arithmetic_teacher_key(cfg.teacher.arithmetic or ArithmeticTeacherConfig())
        folder = cache_dir("teachers", f"arithmetic-{key}")
        if not (folder / "kdkit_teacher.json").is_file():
            raise RuntimeError(f"the arithmetic teacher is not cached in {folder} (KDKIT_CACHE); "
                               "run once without --random-weights to train it")
        teacher, tokenizer = load_teacher(cfg, log=lambda _: None)
    else:
        teacher, tokenizer = load_teacher(cfg, log=lambda _: None)
    return teacher.to(device), tokenizer


def chat_tokenizer(tokenizer: Any) -> Any:
    """The arithmetic tokenizer with a chat template TRL can use: `<bos>prompt` then `completion<eos>`.

    TRL's DistillationTrainer reads only conversational or plain-text prompts and renders them
    itself, so a task with plain prompt/completion text needs a template written for it (kdkit
    reads the pairs directly). With `add_generation_prompt` the template adds nothing.
    """
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    )
    return tokenizer


def chat_ids(tokenizer: Any, samples: list[dict]) -> list[dict[str, Any]]:
    """Each prompt/completion text pair as the token ids both tools train on.

    prompt_ids: the user turn as TRL's DistillationTrainer renders and tokenizes a prompt
    (`apply_chat_template(add_generation_prompt=True, tokenize=True)`); completion_ids: the rest of
    the rendered user + assistant conversation text (the completion and the template's end-of-turn
    tokens), tokenized on its own, as a sampled completion continues the prompt's ids. The rendered
    conversation must start with the rendered prompt (checked).
    """
    out = []
    for sample in samples:
        user = [{"role": "user", "content": sample["prompt"]}]
        both = user + [{"role": "assistant", "content": sample["completion"]}]
        prompt_text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(both, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise AssertionError(
                f"the chat template does not extend the prompt: {prompt_text!r} vs {full_text!r}"
            )
        encoded = tokenizer.apply_chat_template(
            user, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        completion = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        out.append(
            {"prompt": user, "prompt_ids": list(encoded["input_ids"]), "completion_ids": list(completion)}
        )
    return out


def docs_samples(tokenizer: Any, count: int, prompt_tokens: int, completion_tokens: int) -> list[dict]:
    """`count` prompt/completion text pairs cut from consecutive Python-docs token blocks.

    Each block of prompt_tokens + completion_tokens ids is decoded back to text (TRL reads text);
    re-tokenising may change the counts by a token or two, identically for both tools.
    """
    from kdkit.data.python_docs import PythonDocsNotFound, load_python_docs

    block = prompt_tokens + completion_tokens
    try:
        blocks = [b["input_ids"].tolist() for b in
                  load_python_docs(tokenizer, "train", block_size=block, max_tokens=block * (count + 1))]
    except PythonDocsNotFound:  # e.g. a GPU machine without python3.11-doc: this repository's docs
        text = "\n\n".join(path.read_text(encoding="utf-8") for path in sorted((ROOT / "docs").rglob("*.md")))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        blocks = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
        print(f"Python docs not installed: {len(blocks)} blocks of this repository's docs/*.md instead",
              flush=True)
    samples = []
    for index in range(min(count, len(blocks))):
        ids = blocks[index]
        samples.append(
            {
                "prompt": tokenizer.decode(ids[:prompt_tokens]),
                "completion": tokenizer.decode(ids[prompt_tokens:]),
            }
        )
    return samples


def timing_train_config(
    cfg: LMRunConfig, *, warmup: int, steps: int, batch_size: int, seed: int, log_every: int,
    precision: str = "fp32",
) -> Any:
    """The engine settings of a timed kdkit run (part 2 and benchmarks/step_profile.py): constant lr
    1e-4, no decay or warm-up, clipping at 1.0, float32 or bf16 autocast (`choose_precision`), no
    progress bar, no checkpoint while timed, and non-deterministic GPU kernels like TRL's Trainer
    (whose `full_determinism` is off by default; kdkit's `deterministic` default would switch
    `torch.use_deterministic_algorithms` on)."""
    return cfg.train.model_copy(
        update={
            "steps": warmup + steps,
            "batch_size": batch_size,
            "log_every": log_every,
            "checkpoint_every": 10_000,
            "progress": False,
            "schedule": "constant",
            "warmup_steps": 0,
            "lr": 1e-4,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "mixed_precision": {"fp32": "no", "bf16": "bf16"}[precision],
            "deterministic": False,
            "seed": seed,
        }
    )


def kdkit_throughput(
    cfg: LMRunConfig,
    teacher: Any,
    tokenizer: Any,
    samples: list[dict],
    *,
    variant: str,
    lmbda: float,
    steps: int,
    warmup: int,
    batch_size: int,
    max_new_tokens: int,
    work: Path,
    seed: int = 0,
    cache: Path | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Completion tokens/s of kdkit over `steps` timed steps after `warmup` untimed ones.

    variant: "kdkit" (the gkd recipe: λ-mixture, JSD β=0.5 on full logits), "kdkit_fused" (the
    same with `fused: true`), "kdkit_compiled" (the same as "kdkit" with `compile_decode: true`) or
    "kdkit_cache" (supervised_kd, JSD β=0.5, teacher read from the top-8+tail logit cache at
    `cache`; λ must be 0). samples: `chat_ids` records.
    """
    from kdkit.cache.batch import IndexedCollate, IndexedSamples
    from kdkit.config.lm import LMStudentRun
    from kdkit.engine import train
    from kdkit.samplers.collate import PromptCompletionCollator

    student, _ = build_student(cfg, teacher, tokenizer)
    generation = {"max_new_tokens": max_new_tokens, "sampling_temperature": 1.0}
    collate: Any = PromptCompletionCollator(tokenizer, add_eos=False)  # completion ids end the turn already
    data: Any = samples
    if variant == "kdkit_cache":
        if lmbda != 0 or cache is None:
            raise ValueError("kdkit_cache trains off-policy (λ=0) from a cache folder")
        spec = LMStudentRun(name="tp", method="supervised_kd", divergence="jsd", beta=0.5, cache=str(cache))
        data, collate = IndexedSamples(samples), IndexedCollate(collate)
    else:
        if variant == "kdkit_compiled":
            generation["compile_decode"] = True
        spec = LMStudentRun(
            name="tp", method="gkd", lmbda=lmbda, beta=0.5, fused=variant == "kdkit_fused", **generation
        )
    distiller = build_distiller(spec, student, teacher, tokenizer)
    # log only at the end of warm-up and at the end (like TRL's logging_steps here), so per-step
    # logging costs neither tool anything; each record averages its window's steps
    train_cfg = timing_train_config(cfg, warmup=warmup, steps=steps, batch_size=batch_size, seed=seed,
                                    log_every=warmup, precision=precision)
    result = train(distiller, data, train_cfg, work, collate_fn=collate)
    records = [json.loads(line) for line in result.history_path.read_text().splitlines() if line.strip()]
    start = next(r for r in records if r["step"] == warmup)
    timed = [r for r in records if r["step"] > warmup]
    seconds = timed[-1]["elapsed_s"] - start["elapsed_s"]
    tokens = generation_s = 0.0
    previous = warmup
    for record in timed:  # window means × window steps
        tokens += record["diag/tokens"] * (record["step"] - previous)
        generation_s += record.get("diag/gen_s", 0.0) * (record["step"] - previous)
        previous = record["step"]
    return _rates(tokens, seconds, generation_s, steps)


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
    seed: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict[str, float]:
    """Completion tokens/s of TRL's stable `DistillationTrainer` (JSD β=0.5, its tiled chunked loss).

    TRL 1.16's DistillationTrainer is on-policy only (no λ): every step the student generates the
    completions. λ=1 runs it as shipped. For λ=0 the one method that produces completions,
    `_generate_single_turn`, returns the dataset's completion ids instead of sampling, so TRL's own
    prompt rendering, padding, teacher and student forward passes and chunked loss run on the same
    sequences kdkit trains on off-policy. On every batch the prompt ids TRL renders are checked
    against the `prompt_ids` kdkit trains on. samples: `chat_ids` records.
    """
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    class Timed(DistillationTrainer):
        tokens: list[int] = []
        generation: list[float] = []

        def _generate_and_score_completions(self, inputs):  # type: ignore[no-untyped-def, override]
            self._rows, self._gen = inputs, 0.0
            output = super()._generate_and_score_completions(inputs)
            Timed.tokens.append(int(output["completion_mask"].sum()))  # the loss's mask (no tools here)
            Timed.generation.append(self._gen)
            return output

        def _tokenize_prompts(self, prompts):  # type: ignore[no-untyped-def, override]
            prompt_ids, images, multimodal = super()._tokenize_prompts(prompts)
            for ids, row in zip(prompt_ids, self._rows, strict=True):
                if list(ids) != row["prompt_ids"]:
                    raise AssertionError(
                        f"TRL renders the prompt as {list(ids)}, kdkit trains on {row['prompt_ids']}"
                    )
            return prompt_ids, images, multimodal

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):  # type: ignore[no-untyped-def, override]
            started = time.perf_counter()
            if lmbda == 0:
                out = [row["completion_ids"] for row in self._rows]
            else:
                out = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            self._gen += time.perf_counter() - started
            return out

    class Clock(TrainerCallback):
        stamps: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def, override]
            if state.global_step in (warmup, warmup + steps):  # the two stamps read: after the GPU's work
                sync(device)
            Clock.stamps.append(time.perf_counter())

    if lmbda not in (0.0, 1.0):
        raise ValueError("TRL's DistillationTrainer runs λ=1 (as shipped) or λ=0 (dataset completions) here")
    Timed.tokens, Timed.generation, Clock.stamps = [], [], []
    dataset = datasets.Dataset.from_list(samples)
    args = DistillationConfig(
        output_dir=str(work),
        per_device_train_batch_size=batch_size,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim="adamw_torch_fused",  # TRL's default here: torch.optim.AdamW(fused=True), as kdkit's engine
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=warmup + steps,
        beta=0.5,
        temperature=1.0,  # TRL's one temperature: sampling and loss
        top_p=1.0,
        top_k=0,
        max_completion_length=max_new_tokens,
        use_cpu=device == "cpu",
        bf16=precision == "bf16",  # Accelerate's bf16 autocast over fp32 weights, as kdkit's engine
        fp16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        logging_steps=10_000,
        disable_tqdm=True,
        seed=seed,
        dataloader_num_workers=0,
    )
    # as the teacher was before the trainer prepared it (see the `finally` below)
    before = {key: teacher.__dict__[key] for key in ("forward", "_original_forward")
              if key in teacher.__dict__}
    trainer = Timed(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
    try:
        trainer.train()
    finally:
        # with bf16, Accelerate's prepare_model wraps the shared teacher's forward in autocast (and an
        # fp32 cast of its outputs) as an instance attribute: drop it, so that later runs, kdkit's
        # included, get the teacher as it was
        for key in ("forward", "_original_forward"):
            teacher.__dict__.pop(key, None)
        teacher.__dict__.update(before)
    seconds = Clock.stamps[-1] - Clock.stamps[warmup - 1]
    return _rates(sum(Timed.tokens[warmup:]), seconds, sum(Timed.generation[warmup:]), steps)


def _rates(tokens: float, seconds: float, generation: float, steps: int) -> dict[str, float]:
    return {
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "tokens": tokens,
        "steps": steps,
        "s_per_step": seconds / steps,
        "generation_share": generation / seconds,
    }


def build_topk_cache(teacher: Any, tokenizer: Any, samples: list[dict], folder: Path) -> dict[str, Any]:
    """A top-8 + tail logit cache of the teacher at temperature 1 over `samples` (run once)."""
    from kdkit.cache import CacheSettings, write_cache
    from kdkit.samplers.collate import PromptCompletionCollator

    started = time.perf_counter()
    summary = write_cache(
        folder,
        teacher=teacher,
        tokenizer=tokenizer,
        samples=samples,
        collate=PromptCompletionCollator(tokenizer, add_eos=False),
        settings=CacheSettings(mode="topk", k=8, temperature=1.0),
        batch_size=16,
        device=next(teacher.parameters()).device,  # (write_cache moves the teacher there)
        progress=False,
        log=lambda _: None,
    )
    return {"seconds": time.perf_counter() - started, "samples": len(samples), "summary": str(summary)}


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
    variants: tuple[str, ...] = KDKIT_VARIANTS,
    modes: tuple[str, ...] = ("off_policy", "on_policy"),
    on_policy_steps: int | None = None,
    on_policy_warmup: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    random_weights: bool = False,
    deadline: float | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """kdkit's variants and TRL's DistillationTrainer in alternating order, off-policy then on-policy.

    task: "arithmetic" (the character-level teacher, a hand-written plain chat template) or
    "smollm2" (Python-docs prompts of `prompt_tokens` tokens with `max_new_tokens`-token completions,
    rendered through SmolLM2-Instruct's own chat template, which adds its default system turn).
    Round r runs the tools in a rotated order (r places on), reversed on odd rounds, so no tool is
    always first or always after the same one; every tool's round r uses seed r.
    on_policy_steps / on_policy_warmup: the on-policy runs' step counts (default: steps / warmup).
    deadline: a `time.perf_counter()` value after which runs not yet started are skipped (recorded).
    A run that fails is recorded with its error and the others go on. progress(results) is called
    after each mode with what has been measured so far (to save partial results).
    """
    teacher, tokenizer = benchmark_teacher(cfg, random_weights=random_weights, device=device)
    count = (warmup + steps) * batch_size * 2
    if task == "arithmetic":
        from kdkit.tasks.arithmetic import arithmetic_dataset

        texts = arithmetic_dataset(count, tuple(cfg.data.train_digits), seed=7)
        tokenizer = chat_tokenizer(tokenizer)
    else:
        texts = docs_samples(tokenizer, count, prompt_tokens, max_new_tokens)
    samples = chat_ids(tokenizer, texts)
    results: dict[str, Any] = {"samples": len(samples)}
    if "kdkit_cache" in variants and "off_policy" in modes:
        cache = work / "top8-cache"
        results["cache_build"] = build_topk_cache(teacher, tokenizer, samples, cache)
        print(
            f"top-8 cache of {len(samples)} samples built in {results['cache_build']['seconds']:.1f} s",
            flush=True,
        )

    def run(tool: str, lmbda: float, folder: Path, seed: int, **options: Any) -> dict[str, Any]:
        if deadline is not None and time.perf_counter() > deadline:
            return {"skipped": "time budget (--budget-s) spent"}
        started = time.perf_counter()
        try:
            torch.manual_seed(seed)
            if tool == TRL:
                student, _ = build_student(cfg, teacher, tokenizer)
                out: dict[str, Any] = trl_throughput(
                    teacher, student, tokenizer, samples, lmbda=lmbda, work=folder, seed=seed,
                    device=device, precision=precision, **options
                )
            else:
                out = kdkit_throughput(
                    cfg, teacher, tokenizer, samples, variant=tool, lmbda=lmbda, work=folder, seed=seed,
                    cache=work / "top8-cache", precision=precision, **options
                )
        except Exception as error:  # one failing case must not end the whole (GPU) run
            traceback.print_exc()
            out = {"error": f"{type(error).__name__}: {error}"}
        finally:
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        out["run_s"] = time.perf_counter() - started  # set-up included
        return out

    # One untimed run of each tool first: process-wide first-use costs (imports such as
    # TensorBoard's on the engine's first log, kernel warm-up) would otherwise land in round 0.
    first_use = {"steps": 1, "warmup": 1, "batch_size": batch_size, "max_new_tokens": 8}
    results["first_use"] = {}
    for tool in (*[v for v in variants if v not in OFF_POLICY_ONLY], TRL):
        results["first_use"][tool] = run(tool, 1.0, work / f"first-use-{tool}", 0, **first_use)
    for label, lmbda in (("off_policy", 0.0), ("on_policy", 1.0)):
        if label not in modes:
            continue
        on = lmbda == 1.0
        options = {
            "steps": (on_policy_steps or steps) if on else steps,
            "warmup": (on_policy_warmup or warmup) if on else warmup,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
        }
        excluded = ON_POLICY_ONLY if lmbda == 0 else OFF_POLICY_ONLY
        tools = [v for v in variants if v not in excluded] + [TRL]
        runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
        orders = []
        for round_ in range(repeats):
            # rotate and flip the order, so a drift in the machine's load hits every tool alike
            shift_ = round_ % len(tools)
            order = tools[shift_:] + tools[:shift_]
            order = order[::-1] if round_ % 2 else order
            orders.append(order)
            for tool in order:
                measured = run(tool, lmbda, work / f"{tool}-{label}-{round_}", round_, **options)
                runs[tool].append(measured)
                rate = measured.get("tokens_per_s")
                shown = f"{rate:.0f} tok/s" if rate else measured.get("error") or measured.get("skipped")
                print(f"  {label} round {round_} {tool:<16} {shown}  ({measured['run_s']:.1f} s)", flush=True)
        entry: dict[str, Any] = {"runs": runs, "orders": orders, "options": options}
        for tool, measured in runs.items():  # the median round by tokens/s (of the runs that finished)
            done = sorted((r for r in measured if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"])
            if done:
                entry[tool] = done[len(done) // 2]
        entry["ratios_per_round"] = {
            tool: [
                a["tokens_per_s"] / b["tokens_per_s"]
                for a, b in zip(runs[tool], runs[TRL])
                if "tokens_per_s" in a and "tokens_per_s" in b
            ]
            for tool in tools
            if tool != TRL
        }
        entry["ratio_median"] = {
            tool: statistics.median(r) for tool, r in entry["ratios_per_round"].items() if r
        }
        results[label] = entry
        if progress is not None:
            progress(results)
        theirs = entry.get(TRL)
        if theirs is None:
            print(f"{label}: no TRL DistillationTrainer run finished", flush=True)
            continue
        share = theirs["generation_share"]
        print(
            f"{label}: TRL DistillationTrainer {theirs['tokens_per_s']:.0f} tok/s (gen {share:.0%})",
            flush=True,
        )
        for tool, ratios in entry["ratios_per_round"].items():
            ours = entry.get(tool)
            if ours is None or not ratios:
                continue
            print(
                f"  {tool:<12} {ours['tokens_per_s']:.0f} tok/s (gen {ours['generation_share']:.0%}), "
                f"median ratio {entry['ratio_median'][tool]:.2f}x, per round "
                + ", ".join(f"{r:.2f}" for r in ratios),
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
    for key in sorted(k for k in result if k.startswith(THROUGHPUT_KEY) and not k.endswith("_settings")):
        settings = result.get(f"{key}_settings", {})
        lines += [
            f"`{key}` (batch {settings.get('batch_size')}, max_new_tokens {settings.get('max_new_tokens')}, "
            f"{settings.get('warmup')} warm-up + {settings.get('steps')} timed steps, "
            f"{settings.get('repeats')} rounds):",
            "",
            "| policy | tool | completion tokens/s | s/step | tokens/step | generation share"
            " | ÷ TRL (median of rounds) | ÷ TRL per round |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for label in ("off_policy", "on_policy"):
            entry = result[key].get(label)
            if entry is None:
                continue
            for tool in entry["runs"]:
                if tool not in entry:  # no run of it finished (see the JSON's errors)
                    continue
                r = entry[tool]
                rounds = entry["ratios_per_round"].get(tool)
                ratio = f"**{entry['ratio_median'][tool]:.2f}×**" if rounds else ""
                per_round = ", ".join(f"{x:.2f}" for x in rounds) if rounds else ""
                lines.append(
                    f"| {label} | {tool} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.3f} | "
                    f"{r['tokens'] / r['steps']:.0f} | {r['generation_share']:.0%} | {ratio} | {per_round} |"
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
    parser.add_argument("--throughput-steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--on-policy-steps", type=int, default=None,
                        help="timed steps per on-policy run (default: the device's default)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before each timed run")
    parser.add_argument("--skip-policies", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="alternating kdkit/TRL throughput rounds")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="throughput batch size (default: arithmetic 16; SmolLM2 4 on a CPU, 8 on a GPU); "
        "stored under a key naming it",
    )
    parser.add_argument(
        "--throughput-models",
        nargs="+",
        choices=("arithmetic", "smollm2"),
        default=["arithmetic"],
        help="smollm2: throughput only, SmolLM2-135M teacher and derived student (32 new tokens); "
        "both may be given (one process, arithmetic first)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=KDKIT_VARIANTS,
        default=list(KDKIT_VARIANTS),
        help="kdkit variants run against TRL's DistillationTrainer (kdkit_cache: off-policy only, "
        "kdkit_compiled: on-policy only)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("off_policy", "on_policy"),
        default=["off_policy", "on_policy"],
        help="throughput modes to (re)measure; a stored result keeps the modes not rerun",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: float32 (see choose_precision: TRL's training step ignores bf16)")
    parser.add_argument("--random-weights", action="store_true",
                        help="SmolLM2 built from its config.json with random weights (no weights needed)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write lm_policies[_quick].json here (written after every mode) instead of "
                        "docs/benchmarks, without merging earlier results")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip (and record as skipped) runs that would start after this many seconds")
    parser.add_argument("--render", type=Path, help="print the Markdown tables of a result JSON and exit")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(render_tables(json.loads(args.render.read_text())))
        return 0
    started = time.perf_counter()
    deadline = None if args.budget_s is None else started + args.budget_s
    device = choose_device(args.device)
    precision = choose_precision(args.precision, device)
    gpu = device == "cuda"
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    quick = args.quick
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    overrides = [] if args.steps is None and not quick else [f"train.steps={args.steps or 10}"]
    if quick:
        overrides += ["eval.exact_match_problems=80", "data.train_size=2000"]
    cfg = load_run_config(RECIPE, overrides)
    cfg.train.progress = False
    if "smollm2" in args.throughput_models:
        args.skip_policies = True
    if gpu and not args.skip_policies:
        raise SystemExit("part 1 (policies) is a CPU benchmark here; pass --skip-policies with --device cuda")

    result: dict[str, Any] = {
        "quick": quick,
        "seeds": seeds,
        "steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        "threads": args.threads,
        "device": device,
        "precision": precision,
        "random_weights": args.random_weights,
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "gpu": torch.cuda.get_device_name() if gpu else None,
            "load_average_start": list(os.getloadavg()),
        },
        "recipe": str(RECIPE.relative_to(ROOT)),
    }
    suffix = "_quick" if quick else ""
    out_dir = args.out or OUT
    out_file = out_dir / f"lm_policies{suffix}.json"
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["total_s"] = time.perf_counter() - started
        out_file.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="kdkit-lm-policies-") as tmp:
        work = Path(tmp)
        if not args.skip_policies:
            policies = policy_runs(cfg, seeds, work / "policies")
            result["policies"] = policies
            result["summary"] = summarise(policies)
        if not args.skip_throughput:
            for models in args.throughput_models:
                smollm2 = models == "smollm2"
                model_cfg = load_run_config(SMOLLM2_RECIPE) if smollm2 else cfg
                sizes = throughput_sizes(models, gpu=gpu, quick=quick)
                sizes.update({k: v for k, v in (("steps", args.throughput_steps),
                                                ("on_policy_steps", args.on_policy_steps),
                                                ("warmup", args.warmup), ("batch_size", args.batch_size))
                              if v is not None})
                repeats = args.repeats or (1 if quick else 2 if gpu else 3)
                key = f"{THROUGHPUT_KEY}_{models}_b{sizes['batch_size']}"
                key += "" if args.threads == 1 else f"_t{args.threads}"
                key += f"_{device}_{precision}" if gpu or precision != "fp32" else ""
                load_start = list(os.getloadavg())
                result[f"{key}_settings"] = {
                    "models": models,
                    **sizes,
                    "prompt_tokens": 32 if smollm2 else None,
                    "sampling_temperature": 1.0,
                    "jsd_beta": 0.5,
                    "lr": 1e-4,
                    "optimizer": "AdamW(fused=True), weight decay 0, max grad norm 1, constant lr",
                    "device": device,
                    "precision": {"fp32": "float32", "bf16": "bf16 autocast, float32 weights"}[precision],
                    "random_weights": args.random_weights and smollm2,
                    "repeats": repeats,
                    "seeds": "round r: seed r for every tool",
                    "threads": args.threads,
                    "load_average_start": load_start,
                    "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                }
                print(f"== throughput {models}: {sizes}, {repeats} rounds, {device}, {precision}", flush=True)

                def progress(partial: dict[str, Any], key: str = key) -> None:
                    result[key] = partial
                    save()

                try:
                    result[key] = throughput(
                        model_cfg,
                        steps=sizes["steps"],
                        warmup=sizes["warmup"],
                        batch_size=sizes["batch_size"],
                        max_new_tokens=sizes["max_new_tokens"],
                        on_policy_steps=sizes["on_policy_steps"],
                        on_policy_warmup=sizes["on_policy_warmup"],
                        work=work / f"tp-{models}",
                        repeats=repeats,
                        task=models,
                        variants=tuple(args.variants),
                        modes=tuple(args.modes),
                        device=device,
                        precision=precision,
                        random_weights=args.random_weights,
                        deadline=deadline,
                        progress=progress,
                    )
                except Exception as error:  # e.g. a model that cannot be built: the other size still runs
                    traceback.print_exc()
                    result[key] = {"error": f"{type(error).__name__}: {error}"}
                result[f"{key}_settings"]["load_average_end"] = list(os.getloadavg())
                save()
    result["load_average_end"] = list(os.getloadavg())
    if args.out is None and out_file.is_file() and (args.skip_policies or args.skip_throughput):
        # a partial rerun keeps the other part's results (and says when each part ran)
        previous = json.loads(out_file.read_text())
        for key, value in previous.items():
            if key.startswith(("policies", "summary", THROUGHPUT_KEY)) and key not in result:
                result[key] = value
            elif key.startswith(THROUGHPUT_KEY) and not key.endswith("_settings") and "error" not in value:
                # modes measured before and not rerun now stay, with the settings they ran under
                for mode, entry in value.items():
                    if mode not in result[key]:
                        result[key][mode] = entry
                        result[f"{key}_settings"].setdefault("earlier", {})[mode] = previous.get(
                            f"{key}_settings"
                        )
            if args.skip_policies and key in ("seeds", "steps", "batch_size"):
                result[key] = value  # these describe the policies part, which this run kept
        result["previous_run"] = {k: previous.get(k) for k in ("machine", "total_s", "load_average_end")}
    save()
    if "summary" in result:
        plot(result["summary"], result["policies"]["reference"], out_dir / f"lm_policies{suffix}.png")
    print(render_tables(result))
    print(f"total {result['total_s']:.0f} s; wrote {out_file}")
    return 0


def throughput_sizes(models: str, *, gpu: bool, quick: bool) -> dict[str, int]:
    """Steps, batch and new tokens of a throughput run on `models`.

    CPU: arithmetic 3 warm-up + 20 timed steps (quick: 2 + 4), SmolLM2 1 + 3 (quick: 1 + 1), batch 4.
    GPU (H200-sized: every run ≥ ~1 s timed, the whole comparison of both sizes in ~3 min):
    arithmetic 5 + 60 steps off-policy, 2 + 8 on-policy (48 sampled tokens a step); SmolLM2 batch 8,
    3 + 20 off-policy, 1 + 4 on-policy (32 sampled tokens).
    """
    smollm2 = models == "smollm2"
    new_tokens = 32 if smollm2 else 48
    if gpu:
        if smollm2:
            sizes = {"warmup": 3, "steps": 20, "on_policy_warmup": 1, "on_policy_steps": 4, "batch_size": 8}
        else:
            sizes = {"warmup": 5, "steps": 60, "on_policy_warmup": 2, "on_policy_steps": 8, "batch_size": 16}
        if quick:
            sizes |= {"steps": 4, "on_policy_steps": 2}
    elif smollm2:
        steps = 1 if quick else 3
        sizes = {"warmup": 1, "steps": steps, "on_policy_warmup": 1, "on_policy_steps": steps,
                 "batch_size": 4}
    else:
        warmup, steps = (2, 4) if quick else (3, 20)
        sizes = {"warmup": warmup, "steps": steps, "on_policy_warmup": warmup, "on_policy_steps": steps,
                 "batch_size": 16}
    return sizes | {"max_new_tokens": new_tokens}


if __name__ == "__main__":
    raise SystemExit(main())
