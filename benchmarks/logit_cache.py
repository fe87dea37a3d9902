"""Teacher-logit caches: bytes per token, student quality from sparse caches, throughput vs a live teacher.

Part 1 (bytes): each cache mode (top-k 8/32/128 with tail, random sampling with 12 draws, dense where
the vocabulary is small) written for real over (a) the arithmetic task (vocabulary 16) and (b) with
`--smollm2`, SmolLM2-135M-Instruct over Python-docs blocks (vocabulary 49,152): stored bytes per
token (files on disk / positions), mean unique ids per sampled position, teacher mass outside the
top-k.

Part 2 (quality, arithmetic): the cached arithmetic teacher distilled into a smaller student at equal
optimizer steps by: cross-entropy only (no teacher), dense online forward KL (teacher live), and forward
KL from top-k 8/32/128 (+tail) and random-sampling (12 draws) caches; seeds 0,1,2. Held-out perplexity,
top-1 agreement with the teacher, exact match by operand length.

Part 3 (throughput): optimizer steps per second of the same student trained from the live teacher and
from caches, alternating in one process.

    .venv/bin/python benchmarks/logit_cache.py                 # parts 1-3 on arithmetic
    .venv/bin/python benchmarks/logit_cache.py --smollm2-bytes # part 1 on SmolLM2 too
    .venv/bin/python benchmarks/logit_cache.py --quick         # smoke run

Writes docs/benchmarks/logit_cache[_quick].json; the Markdown document is written from it by hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kdkit.cache import CacheReader, CacheSettings, bytes_per_token_formula, write_cache

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"

BYTE_MODES: dict[str, CacheSettings] = {
    "topk8": CacheSettings(mode="topk", k=8),
    "topk32": CacheSettings(mode="topk", k=32),
    "topk128": CacheSettings(mode="topk", k=128),
    "topk8_uint8": CacheSettings(mode="topk", k=8, values="uint8"),
    "topk32_uint8": CacheSettings(mode="topk", k=32, values="uint8"),
    "topk128_uint8": CacheSettings(mode="topk", k=128, values="uint8"),
    "sampled12": CacheSettings(mode="sampled", draws=12),
    "sampled12_tau0.5": CacheSettings(mode="sampled", draws=12, proposal_temperature=0.5),
    "dense": CacheSettings(mode="dense"),
}


# ----------------------------------------------------------------------------- part 1: bytes


def measure_bytes(
    teacher: Any, tokenizer: Any, samples: Any, collate: Any, work: Path, *, batch_size: int
) -> dict[str, Any]:
    """Write every applicable mode over `samples`; bytes per token and target statistics per mode."""
    from kdkit.cache.writer import teacher_vocab_size

    vocab = teacher_vocab_size(teacher)
    rows: dict[str, Any] = {}
    for name, settings in BYTE_MODES.items():
        if settings.mode == "dense" and vocab > settings.max_dense_vocab:
            continue
        if settings.mode == "topk" and settings.k > vocab:
            continue
        started = time.perf_counter()
        summary = write_cache(
            work / name,
            teacher=teacher,
            tokenizer=tokenizer,
            samples=samples,
            collate=collate,
            settings=settings,
            batch_size=batch_size,
            progress=False,
            log=lambda _: None,
        )
        reader = CacheReader(work / name)
        row: dict[str, Any] = {
            "bytes_per_token": reader.bytes_per_token(),
            "positions": summary.positions_written,
            "write_s": time.perf_counter() - started,
        }
        stats = _target_stats(reader)
        if settings.mode == "sampled":
            row["mean_unique_ids"] = stats["unique"]
            row["formula_bytes_per_token"] = bytes_per_token_formula(settings, vocab, unique=stats["unique"])
        else:
            row["formula_bytes_per_token"] = bytes_per_token_formula(settings, vocab)
        if settings.mode == "topk":
            row["mean_tail_mass"] = stats["tail"]
        rows[name] = row
        print(f"  {name:18s} {row['bytes_per_token']:8.1f} B/token  {json.dumps(stats)}", flush=True)
    return {"vocab_size": vocab, "modes": rows}


def _target_stats(reader: CacheReader) -> dict[str, float]:
    unique, tail, n = 0.0, 0.0, 0
    for _, arrays in reader.iter_samples():
        if "n_unique" in arrays:
            unique += float(arrays["n_unique"].astype("float64").sum())
        if "tail_logprob" in arrays:
            tail += float(torch.from_numpy(arrays["tail_logprob"].astype("float32")).exp().sum())
        per_position = arrays.get("n_unique", arrays.get("tail_logprob", arrays.get("entropy")))
        n += len(per_position) if per_position is not None else len(arrays["logprobs"])
    return {"unique": unique / max(n, 1), "tail": tail / max(n, 1)}


def bytes_arithmetic(work: Path, samples: int) -> dict[str, Any]:
    from kdkit.pipelines.teachers import get_arithmetic_teacher
    from kdkit.samplers.collate import PromptCompletionCollator
    from kdkit.tasks.arithmetic import arithmetic_dataset

    teacher, tokenizer, _ = get_arithmetic_teacher()
    data = arithmetic_dataset(samples, (1, 4), seed=0)
    return measure_bytes(teacher, tokenizer, data, PromptCompletionCollator(tokenizer), work, batch_size=64)


def bytes_smollm2(work: Path, blocks: int) -> dict[str, Any]:
    from kdkit.data.python_docs import load_python_docs
    from kdkit.data.text import text_collator
    from kdkit.models.smollm2 import load_smollm2

    teacher, tokenizer = load_smollm2("float32")
    data = load_python_docs(tokenizer, "train", block_size=128, prompt_tokens=32, max_tokens=blocks * 128)
    samples = [data[i] for i in range(min(blocks, len(data)))]
    return measure_bytes(teacher, tokenizer, samples, text_collator(tokenizer), work, batch_size=4)


# ----------------------------------------------------------------------------- part 2: quality


def arithmetic_config(
    steps: int, batch_size: int, train_size: int, eval_problems: int, temperature: float = 1.0
) -> dict[str, Any]:
    """The run config of parts 2 and 3 (recipes/arithmetic-policies.yaml's teacher, student, budget);
    `temperature`: the distillation temperature (caches are built at it)."""
    cfg = {
        "kind": "lm",
        "name": "logit-cache-bench",
        "teacher": {"source": "arithmetic"},
        "student": {"keep_layers": 3, "intermediate_size": 48},
        "data": {
            "dataset": "arithmetic",
            "train_size": train_size,
            "train_digits": [1, 3],
            "eval_digits": [1, 4],
            "eval_size": 256,
        },
        "caches": {
            "top2": {"mode": "topk", "k": 2, "batch_size": 64},
            "top4": {"mode": "topk", "k": 4, "batch_size": 64},
            "top8": {"mode": "topk", "k": 8, "batch_size": 64},
            "sampled12": {"mode": "sampled", "draws": 12, "batch_size": 64},
            "dense": {"mode": "dense", "batch_size": 64},
        },
        "students": [
            {"name": "ce_only", "method": "supervised_kd", "kd_weight": 0.0, "ce_weight": 1.0},
            {"name": "dense_online", "method": "supervised_kd"},
            {"name": "dense_cache", "method": "supervised_kd", "cache": "dense"},
            {"name": "top2_tail", "method": "supervised_kd", "cache": "top2"},
            {"name": "top4_tail", "method": "supervised_kd", "cache": "top4"},
            {"name": "top8_tail", "method": "supervised_kd", "cache": "top8"},
            {"name": "top4_renorm", "method": "supervised_kd", "cache": "top4", "cache_tail": False},
            {"name": "sampled12", "method": "supervised_kd", "cache": "sampled12"},
        ],
        "train": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": 1e-3,
            "warmup_steps": max(steps // 10, 1),
            "weight_decay": 0.01,
            "log_every": max(steps // 5, 1),
            "checkpoint_every": 100_000,
            "mixed_precision": "no",
            "progress": False,
        },
        "eval": {"batch_size": 64, "samples": 0, "exact_match_problems": eval_problems},
        "threads": 1,
    }
    for cache in cfg["caches"].values():
        cache["temperature"] = temperature
    for student in cfg["students"]:
        student["temperature"] = temperature
    cfg["name"] += f"-t{temperature:g}"
    return cfg


def smollm2_config(
    steps: int,
    batch_size: int,
    *,
    keep_layers: Any,
    lr: float,
    eval_tokens: int,
    prompt_tokens: int = 0,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Part 2 at SmolLM2 size: SmolLM2-135M-Instruct -> a student derived from some of its layers, on
    Python-docs blocks of 128 tokens (by default all trained: plain LM samples); one block per
    training sample, each used once."""
    # small shards: the processes training the cache students write the caches together (each
    # takes the next shard no one holds; one teacher pass for the four caches)
    cache = {"batch_size": 4, "temperature": temperature, "samples_per_shard": 16}
    return {
        "kind": "lm",
        "name": f"logit-cache-quality-smollm2-t{temperature:g}",
        "teacher": {"source": "smollm2"},
        "student": {"keep_layers": keep_layers},
        "data": {
            "dataset": "python_docs",
            "block_size": 128,
            "prompt_tokens": prompt_tokens,
            "max_tokens": 128 * batch_size * steps,
            "eval_max_tokens": eval_tokens,
        },
        "caches": {
            "top8": {"mode": "topk", "k": 8, **cache},
            "top32": {"mode": "topk", "k": 32, **cache},
            "top128": {"mode": "topk", "k": 128, **cache},
            "sampled12": {"mode": "sampled", "draws": 12, **cache},
        },
        "students": [
            {"name": "ce_only", "method": "supervised_kd", "kd_weight": 0.0, "ce_weight": 1.0},
            {"name": "dense_online", "method": "supervised_kd"},
            {"name": "top8_tail", "method": "supervised_kd", "cache": "top8"},
            {"name": "top32_tail", "method": "supervised_kd", "cache": "top32"},
            {"name": "top128_tail", "method": "supervised_kd", "cache": "top128"},
            {"name": "sampled12", "method": "supervised_kd", "cache": "sampled12"},
        ]
        + [],
        "train": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "warmup_steps": max(steps // 10, 1),
            "weight_decay": 0.0,
            "log_every": max(steps // 5, 1),
            "checkpoint_every": 100_000,
            "mixed_precision": "no",
            "progress": False,
        },
        "eval": {"batch_size": 8, "samples": 0},
        "threads": 1,
    }


def quality(
    cfg_dict: dict[str, Any], seeds: list[int], work: Path, only: list[str] | None = None
) -> dict[str, Any]:
    """Train every student per seed (same data and caches; the seed changes the data order)."""
    from kdkit.config.lm import LMRunConfig
    from kdkit.engine import train
    from kdkit.pipelines.cache import prepare_cached_training, resolve_student
    from kdkit.pipelines.lm import build_distiller, build_student, evaluate_model, load_lm_data, load_teacher

    if only and not any(s.get("cache") for s in cfg_dict["students"] if s["name"] in only):
        # no student here reads a cache: build none (else every cache of the config is built, in
        # one teacher pass; another process training other students waits on its shard locks)
        cfg_dict = {**cfg_dict, "students": [s for s in cfg_dict["students"] if s["name"] in only]}
    cfg = LMRunConfig.model_validate(cfg_dict)
    teacher, tokenizer = load_teacher(cfg, log=lambda _: None)
    data = load_lm_data(cfg, tokenizer)
    started = time.perf_counter()
    folders, train_set, collate = prepare_cached_training(
        cfg, teacher=teacher, tokenizer=tokenizer, train=data.train, collate=data.collate, log=print
    )
    cache_s = time.perf_counter() - started
    sizes = {name: CacheReader(folder).bytes_per_token() for name, folder in folders.items()}
    reference = evaluate_model(teacher, teacher, tokenizer, cfg, data, is_teacher=True)
    initial, _ = build_student(cfg, teacher, tokenizer)
    import copy

    reference_student = evaluate_model(copy.deepcopy(initial), teacher, tokenizer, cfg, data)
    print(f"teacher {json.dumps(_short(reference))}\ninitial student {json.dumps(_short(reference_student))}")
    runs = []
    for seed in seeds:
        for student_cfg in cfg.students:
            if only and student_cfg.name not in only:
                continue
            train_cfg = cfg.train.model_copy(update={"seed": seed})
            torch.manual_seed(seed)
            distiller = build_distiller(
                resolve_student(student_cfg, folders), copy.deepcopy(initial), teacher, tokenizer
            )
            result = train(
                distiller,
                train_set,
                train_cfg,
                work / f"{student_cfg.name}-{seed}",
                collate_fn=collate,
                description=f"{student_cfg.name} seed {seed}",
            )
            row = evaluate_model(distiller.student.eval(), teacher, tokenizer, cfg, data)
            row |= {
                "variant": student_cfg.name,
                "seed": seed,
                "wall_s": result.wall_time_s,
                "final_losses": result.final_losses,
            }
            runs.append(row)
            print(
                f"{student_cfg.name:<14} seed {seed}: {result.wall_time_s:5.1f} s {json.dumps(_short(row))}",
                flush=True,
            )
    return {
        "config": cfg_dict,
        "cache_build_s": cache_s,
        "cache_bytes_per_token": sizes,
        "teacher": reference,
        "initial_student": reference_student,
        "runs": runs,
    }


def _short(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("perplexity", "agreement", "exact_match", "exact_match_d4")
    return {k: round(row[k], 4) for k in keys if k in row}


# ----------------------------------------------------------------------------- part 3: throughput


def throughput(
    cfg_dict: dict[str, Any],
    work: Path,
    *,
    student: dict[str, Any],
    steps: int,
    rounds: int,
    batch_size: int,
    variants: tuple[str, ...] = ("dense_online", "top8_tail", "sampled12", "dense_cache"),
    teacher_model: tuple[Any, Any] | None = None,
    components: bool = False,
) -> dict[str, Any]:
    """Optimizer steps/s of one student from the live teacher and from caches, interleaved in rounds.

    Each round runs `steps` timed steps of every variant (after one untimed warm-up step), so the
    machine's load affects all variants alike; reported: median over rounds of tokens/s, and the
    per-round ratio to the live teacher. teacher_model: (model, tokenizer) instead of loading
    cfg's teacher. components: also time, in every round, the teacher's forward alone, reading the
    cached targets alone (`batch_target`) and a no-teacher (cross-entropy) student step: the bound
    on a cache's speed-up is (teacher forward + student step) / student step.
    """
    import copy
    import statistics

    from kdkit.cache.batch import batch_target
    from kdkit.config.lm import LMRunConfig
    from kdkit.eval import count_parameters
    from kdkit.pipelines.cache import prepare_cached_training, resolve_student
    from kdkit.pipelines.lm import build_distiller, build_student, load_lm_data, load_teacher
    from kdkit.signals.base import model_inputs

    cfg_dict = copy.deepcopy(cfg_dict) | {"student": student}
    if components and "ce_only" not in variants:
        variants = ("ce_only", *variants)
        cfg_dict["students"].append(
            {"name": "ce_only", "method": "supervised_kd", "kd_weight": 0.0, "ce_weight": 1.0}
        )
    cfg_dict["students"] = [s for s in cfg_dict["students"] if s["name"] in variants]
    cfg = LMRunConfig.model_validate(cfg_dict)
    teacher, tokenizer = teacher_model or load_teacher(cfg, log=lambda _: None)
    data = load_lm_data(cfg, tokenizer)
    folders, train_set, collate = prepare_cached_training(
        cfg, teacher=teacher, tokenizer=tokenizer, train=data.train, collate=data.collate, log=lambda _: None
    )
    initial, _ = build_student(cfg, teacher, tokenizer)
    batches = [
        collate([train_set[i] for i in range(j * batch_size, (j + 1) * batch_size)]) for j in range(steps + 1)
    ]
    setups = {}
    for student_cfg in cfg.students:
        distiller = build_distiller(
            resolve_student(student_cfg, folders), copy.deepcopy(initial), teacher, tokenizer
        )
        optimizer = torch.optim.AdamW(distiller.parameters(), lr=1e-4)
        setups[student_cfg.name] = (distiller, optimizer)

    def step(distiller: Any, optimizer: Any, batch: dict[str, Any]) -> None:
        terms = distiller(batch)
        loss = sum(v for k, v in terms.items() if not k.startswith("_"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed: dict[str, Any] = {name: (lambda b, s=setups[name]: step(*s, b)) for name in setups}
    if components:
        with_cache = [name for name in setups if getattr(setups[name][0].signal, "reader", None)]

        @torch.no_grad()
        def teacher_forward(batch: dict[str, Any]) -> None:
            teacher(**model_inputs(batch))

        timed["teacher_forward"] = teacher_forward
        for name in with_cache:
            reader = setups[name][0].signal.reader
            timed[f"read_{name}"] = lambda b, r=reader: batch_target(r, b)

    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches[1:])
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    for round_index in range(rounds):
        order = list(timed) if round_index % 2 == 0 else list(reversed(timed))  # alternate the order
        for name in order:
            if round_index == 0 or not components:
                timed[name](batches[0])  # warm-up (with components: first round only, to save time)
            started = time.perf_counter()
            for batch in batches[1:]:
                timed[name](batch)
            seconds[name].append(time.perf_counter() - started)
        print(
            f"  round {round_index}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items()),
            flush=True,
        )
    rates = {name: [tokens / s for s in seconds[name]] for name in setups}
    medians = {name: statistics.median(r) for name, r in rates.items()}
    live = medians["dense_online"]
    per_round = {
        name: [a / b for a, b in zip(rates[name], rates["dense_online"], strict=True)] for name in setups
    }
    out = {
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(initial),
        "flops": {"teacher": _forward_macs(teacher), "student": _forward_macs(initial)},
        "batch_size": batch_size,
        "steps_per_round": steps,
        "rounds": rounds,
        "tokens_per_s": rates,
        "median_tokens_per_s": medians,
        "speedup_vs_online": {name: m / live for name, m in medians.items()},
        "speedup_per_round": per_round,
        "seconds": seconds,
    }
    if components:
        teacher_s = statistics.median(seconds["teacher_forward"])
        student_s = statistics.median(seconds["ce_only"])
        out["bound"] = (teacher_s + student_s) / student_s
        out["component_median_s"] = {name: statistics.median(v) for name, v in seconds.items()}
    return out


#: SmolLM2-360M's shape (its published config); built with random weights for timing only.
SMOLLM2_360M_SHAPE = {
    "model_type": "llama",
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
    "max_position_embeddings": 2048,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
#: One layer of SmolLM2-135M's shape (random weights).
SMOLLM2_135M_ONE_LAYER = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 1,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


def pairs_throughput(
    work: Path, *, steps: int, rounds: int, batch: int = 2, save: Any = None
) -> dict[str, Any]:
    """Cache vs live teacher where the teacher is >= 5x the student (non-embedding parameters):
    (a) SmolLM2-135M-Instruct -> its layer 0 alone (derived, teacher weights); (b) a SmolLM2-360M-shaped
    teacher with random weights (only its cost matters here) -> a 1-layer SmolLM2-135M-shaped student.
    Python-docs blocks of 128 tokens, all trained; variants and components interleaved in rounds."""
    from kdkit.models.lm import build_causal_lm
    from kdkit.models.smollm2 import load_smollm2

    smol, tokenizer = load_smollm2("float32")

    def cfg(name: str) -> dict[str, Any]:
        return {
            "kind": "lm",
            "name": f"logit-cache-pairs-{name}",
            "teacher": {"source": "smollm2"},
            "student": {"keep_layers": [0]},
            "data": {
                "dataset": "python_docs",
                "block_size": 128,
                "prompt_tokens": 0,
                "max_tokens": 128 * batch * (steps + 2),
                "eval_max_tokens": 256,
            },
            "caches": {
                "top8": {"mode": "topk", "k": 8, "batch_size": batch},
                "sampled12": {"mode": "sampled", "draws": 12, "batch_size": batch},
            },
            "students": [
                {"name": "dense_online", "method": "supervised_kd"},
                {"name": "top8_tail", "method": "supervised_kd", "cache": "top8"},
                {"name": "sampled12", "method": "supervised_kd", "cache": "sampled12"},
            ],
            "train": {"steps": steps, "batch_size": batch, "lr": 1e-4, "progress": False},
            "threads": 1,
        }

    variants = ("dense_online", "top8_tail", "sampled12")
    out = {}
    print("part 3: SmolLM2-135M -> 1 layer", flush=True)
    out["smollm2_135m_to_1layer"] = throughput(
        cfg("135m"),
        work,
        student={"keep_layers": [0]},
        steps=steps,
        rounds=rounds,
        batch_size=batch,
        variants=variants,
        teacher_model=(smol, tokenizer),
        components=True,
    )
    print(json.dumps(out["smollm2_135m_to_1layer"]["speedup_vs_online"]), flush=True)
    if save is not None:  # pair (b) is long: keep pair (a) if it is interrupted
        save(out)
    shape = SMOLLM2_360M_SHAPE | {"vocab_size": smol.config.vocab_size}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        shape[key] = getattr(smol.config, key)
    big = build_causal_lm(shape, seed=0).eval()
    del smol
    print("part 3: SmolLM2-360M shape (random) -> 1 layer of 135M shape", flush=True)
    out["smollm2_360m_shape_to_1layer"] = throughput(
        cfg("360m-shape"),
        work,
        student={"config": SMOLLM2_135M_ONE_LAYER, "seed": 0},
        steps=steps,
        rounds=rounds,
        batch_size=batch,
        variants=variants,
        teacher_model=(big, tokenizer),
        components=True,
    )
    print(json.dumps(out["smollm2_360m_shape_to_1layer"]["speedup_vs_online"]), flush=True)
    return out


def sparse_loss_cost(*, rounds: int, tokens: int = 508, k: int = 8) -> dict[str, Any]:
    """The sparse loss alone at SmolLM2's shapes (V = 49,152, H = 576), forward + backward from the
    student's hidden states: materialised logits + `sparse_divergence` (what the objective did before)
    vs `fused_sparse_divergence`, alternating; seconds per call and peak extra memory (tracemalloc
    does not see torch's allocator, so the [N, V] float32 tensors are counted from their shapes)."""
    import statistics

    from kdkit.losses.fused import LinearHead
    from kdkit.losses.sparse import sampled_target, sparse_divergence, topk_target
    from kdkit.losses.sparse_fused import fused_sparse_divergence

    g = torch.Generator().manual_seed(0)
    vocab, width = 49_152, 576
    weight = (torch.randn(vocab, width, generator=g) * 0.02).requires_grad_()
    hidden = torch.randn(tokens, width, generator=g).requires_grad_()
    teacher = torch.randn(tokens, vocab, generator=g) * 3
    targets = {
        "top8": {k_: v for k_, v in topk_target(teacher, k).items() if k_ != "entropy"},
        "sampled12": {
            k_: v for k_, v in sampled_target(teacher, 12, generator=g).items() if k_ in ("ids", "weights")
        },
    }
    head = LinearHead(weight)

    def materialised(target: dict[str, torch.Tensor]) -> None:
        sparse_divergence(head.logits(hidden), **target).backward()

    def fused(target: dict[str, torch.Tensor]) -> None:
        fused_sparse_divergence(hidden, head, **target).loss.backward()

    seconds: dict[str, list[float]] = {}
    for r in range(rounds):
        for kind, target in targets.items():
            for name, fn in (("materialised", materialised), ("fused", fused)):
                order_key = f"{kind}_{name}"
                fn(target)  # warm-up (first call allocates the fused workspace)
                started = time.perf_counter()
                fn(target)
                seconds.setdefault(order_key, []).append(time.perf_counter() - started)
                weight.grad = hidden.grad = None
        print(
            f"  loss round {r}: " + ", ".join(f"{k_} {v[-1]:.2f}s" for k_, v in seconds.items()), flush=True
        )
    return {
        "tokens": tokens,
        "vocab": vocab,
        "hidden": width,
        "seconds": seconds,
        "median_s": {k_: statistics.median(v) for k_, v in seconds.items()},
    }


def _forward_macs(model: Any) -> dict[str, float]:
    """Multiply-accumulates per token of a forward pass, from the weight matrices (attention scores
    over a 128-token context excluded: ~2% here): layers (non-embedding) and the LM head."""
    config = model.config
    head = config.vocab_size * config.hidden_size
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    return {"layers": float(layers), "head": float(head), "total": float(layers + head)}


# ----------------------------------------------------------------------------- tables


def render(results: dict[str, Any]) -> str:
    """Markdown tables of a results JSON (what docs/benchmarks/logit_cache.md shows)."""
    import statistics

    lines: list[str] = []
    for key, title in (("bytes_arithmetic", "arithmetic"), ("bytes_smollm2", "SmolLM2 / Python docs")):
        if key not in results:
            continue
        part = results[key]
        lines += [
            f"\n**Bytes per token, {title}** (vocabulary {part['vocab_size']:,})\n",
            "| mode | stored bytes/token | formula | teacher mass outside the kept ids | mean unique ids |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in part["modes"].items():
            tail = f"{row['mean_tail_mass']:.3f}" if "mean_tail_mass" in row else "—"
            unique = f"{row['mean_unique_ids']:.2f}" if "mean_unique_ids" in row else "—"
            lines.append(
                f"| {name} | {row['bytes_per_token']:.1f} | {row['formula_bytes_per_token']:.1f} | "
                f"{tail} | {unique} |"
            )
    for key in sorted(k for k in results if k.startswith("quality_arithmetic")):
        part = results[key]
        runs = part["runs"]
        variants = list(dict.fromkeys(r["variant"] for r in runs))
        seeds = sorted({r["seed"] for r in runs})
        dense = [r["perplexity"] for r in runs if r["variant"] == "dense_online"]
        dense_ppl = statistics.fmean(dense) if dense else None
        lines += [
            f"\n**Student quality, {key.removeprefix('quality_arithmetic_')}** (seeds {seeds}; "
            "mean ± population std)\n",
            "| student | bytes/token | held-out perplexity | vs dense online | agreement "
            "| exact match (1–4 digits) | exact match, 4 digits | train s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        caches = part.get("cache_bytes_per_token", {})
        for variant in variants:
            rows = [r for r in runs if r["variant"] == variant]

            def stat(field: str, scale: float = 1.0, spec: str = ".4f", rows: list = rows) -> str:
                values = [r[field] * scale for r in rows]
                if len(values) == 1:
                    return format(values[0], spec)
                return f"{format(statistics.fmean(values), spec)} ± {format(statistics.pstdev(values), spec)}"

            uses = {st["name"]: st.get("cache") for st in part["config"]["students"]}
            cache = caches.get(uses.get(variant) or "")
            size = f"{cache:.1f}" if cache is not None else ("—" if variant == "ce_only" else "live")
            rel = (
                f"{(statistics.fmean(r['perplexity'] for r in rows) / dense_ppl - 1) * 100:+.2f}%"
                if dense_ppl
                else "—"
            )
            lines.append(
                f"| {variant} | {size} | {stat('perplexity')} | {rel} | {stat('agreement', 100, '.2f')}% "
                f"| {stat('exact_match', 100, '.1f')}% | {stat('exact_match_d4', 100, '.1f')}% | "
                f"{stat('wall_s', 1, '.0f')} |"
            )
        lines.append(
            f"\nteacher: perplexity {part['teacher']['perplexity']:.4f}, exact match "
            f"{part['teacher']['exact_match'] * 100:.1f}%; initial student: perplexity "
            f"{part['initial_student']['perplexity']:.4f}, agreement "
            f"{part['initial_student']['agreement'] * 100:.1f}%, exact match "
            f"{part['initial_student']['exact_match'] * 100:.1f}%"
        )
    throughputs = dict(results.get("throughput_arithmetic", {}))
    if "throughput_smollm2" in results:
        throughputs["smollm2_3layer"] = results["throughput_smollm2"]
    for name, part in throughputs.items():
        ratio = part["teacher_parameters"] / part["student_parameters"]
        lines += [
            f"\n**Throughput, student {name}** ({part['student_parameters']:,} parameters; teacher "
            f"{part['teacher_parameters']:,}, {ratio:.1f}×; batch {part['batch_size']}, "
            f"{part['steps_per_round']} steps × {part['rounds']} interleaved rounds)\n",
            "| signal | tokens/s (median) | range over rounds | vs online |",
            "|---|---:|---:|---:|",
        ]
        for variant, median in part["median_tokens_per_s"].items():
            values = part["tokens_per_s"][variant]
            lines.append(
                f"| {variant} | {median:,.0f} | {min(values):,.0f}–{max(values):,.0f} | "
                f"{part['speedup_vs_online'][variant]:.2f}× |"
            )
    if "quality_smollm2_t1" in results:
        lines += render_smollm2_quality(results["quality_smollm2_t1"])
    for name, part in results.get("throughput_pairs", {}).items():
        lines += render_pair(name, part)
    return "\n".join(lines) + "\n"


def render_smollm2_quality(part: dict[str, Any]) -> list[str]:
    runs = part["runs"]
    order = ["ce_only", "dense_online", "top8_tail", "top32_tail", "top128_tail", "sampled12"]
    by_name = {r["variant"]: r for r in runs}
    dense = by_name.get("dense_online", {}).get("perplexity")
    uses = {st["name"]: st.get("cache") for st in part["config"]["students"]}
    caches = part.get("cache_bytes_per_token", {})
    start = part["initial_student"]
    cfg = part["config"]
    lines = [
        f"\n**Student quality, SmolLM2 / Python docs** (seed {sorted({r['seed'] for r in runs})}; "
        f"{cfg['train']['steps']} steps of {cfg['train']['batch_size']} blocks of "
        f"{cfg['data']['block_size']} tokens, lr {cfg['train']['lr']:g})\n",
        "| student | bytes/token | held-out perplexity (start → end) | vs dense online | top-1 agreement "
        "(start → end) | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in [n for n in order if n in by_name] + [n for n in by_name if n not in order]:
        r = by_name[name]
        size = caches.get(uses.get(name) or "")
        size_text = f"{size:.1f}" if size is not None else ("—" if name == "ce_only" else "live")
        rel = f"{(r['perplexity'] / dense - 1) * 100:+.1f}%" if dense else "—"
        lines.append(
            f"| {name} | {size_text} | {start['perplexity']:,.0f} → {r['perplexity']:.2f} | {rel} | "
            f"{start['agreement'] * 100:.1f}% → {r['agreement'] * 100:.1f}% | {r['wall_s']:.0f} |"
        )
    lines.append(
        f"\nteacher: perplexity {part['teacher']['perplexity']:.2f} on the same "
        f"{int(part['teacher'].get('eval_tokens', 0)):,} held-out tokens"
    )
    return lines


def render_pair(name: str, part: dict[str, Any]) -> list[str]:
    import statistics

    f_t, f_s = part["flops"]["teacher"], part["flops"]["student"]
    comp = part["component_median_s"]
    lines = [
        f"\n**Throughput, {name}** (batch {part['batch_size']} × 128 tokens, {part['steps_per_round']} "
        f"timed steps × {part['rounds']} rounds, order alternating)\n",
        f"Teacher/student: parameters {part['teacher_parameters'] / 1e6:.1f}M / "
        f"{part['student_parameters'] / 1e6:.1f}M "
        f"({part['teacher_parameters'] / part['student_parameters']:.1f}×); "
        f"non-embedding (layer) weights {f_t['layers'] / 1e6:.1f}M / {f_s['layers'] / 1e6:.1f}M "
        f"({f_t['layers'] / f_s['layers']:.1f}×); forward MACs per token with the LM head "
        f"{f_t['total'] / 1e6:.1f}M / {f_s['total'] / 1e6:.1f}M ({f_t['total'] / f_s['total']:.1f}×).\n",
        "| signal | tokens/s (median) | per-round ratio to online | median ratio |",
        "|---|---:|---|---:|",
    ]
    for variant, median in part["median_tokens_per_s"].items():
        ratios = ", ".join(f"{x:.2f}" for x in part["speedup_per_round"][variant])
        lines.append(f"| {variant} | {median:,.0f} | {ratios} | {part['speedup_vs_online'][variant]:.2f}× |")
    steps = part["steps_per_round"]
    bounds = [
        (t + s) / s
        for t, s in zip(part["seconds"]["teacher_forward"], part["seconds"]["ce_only"], strict=True)
    ]
    reads = {k.removeprefix("read_"): v / steps * 1000 for k, v in comp.items() if k.startswith("read_")}
    lines.append(
        "\nComponents (median over rounds, per step): teacher forward "
        f"{comp['teacher_forward'] / steps:.2f} s, "
        f"no-teacher student step (forward, backward, AdamW) {comp['ce_only'] / steps:.2f} s, reading the "
        "cached targets "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in reads.items())
        + f". Bound on a cache's speed-up, (teacher forward + student step) / student step: "
        f"**{part['bound']:.2f}×**; per round: "
        + ", ".join(f"{b:.2f}" for b in bounds)
        + f" (median {statistics.median(bounds):.2f})."
    )
    return lines


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smollm2-bytes", action="store_true", help="part 1 on SmolLM2 / Python docs too")
    parser.add_argument("--smollm2-blocks", type=int, default=32)
    parser.add_argument("--only", choices=["bytes", "quality", "throughput", "none"], action="append")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", help="only these students in part 2")
    parser.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=[4.0, 1.0],
        help="part 2 distillation temperatures (all seeds for the first, seed 0 for the rest)",
    )
    parser.add_argument("--smollm2-throughput", action="store_true", help="part 3 at SmolLM2 size")
    parser.add_argument("--smollm2-steps", type=int, default=4)
    parser.add_argument("--loss-cost", action="store_true", help="the sparse loss alone, fused vs not")
    parser.add_argument(
        "--pairs-throughput",
        action="store_true",
        help="part 3 for teachers >= 5x the student: SmolLM2-135M -> 1 layer, and a SmolLM2-360M-shaped "
        "teacher (random weights: timing only) -> a 1-layer SmolLM2-135M-shaped student; with components",
    )
    parser.add_argument(
        "--smollm2-quality", action="store_true", help="part 2 at SmolLM2 size (steps: --steps)"
    )
    parser.add_argument("--smollm2-keep", default="6", help="layers the SmolLM2 student keeps")
    parser.add_argument("--smollm2-lr", type=float, default=5e-4)
    parser.add_argument("--smollm2-eval-tokens", type=int, default=2048)
    parser.add_argument("--render", type=Path, nargs="+", help="print the tables of these result JSONs")
    args = parser.parse_args(argv)
    if args.render:
        merged: dict[str, Any] = {}
        for path in args.render:
            for key, value in json.loads(path.read_text()).items():
                if key.startswith("quality_") and key in merged:  # students trained in other processes
                    merged[key] = {**merged[key], "runs": merged[key]["runs"] + value["runs"]}
                    merged[key]["cache_bytes_per_token"] |= value.get("cache_bytes_per_token", {})
                else:
                    merged[key] = value
        print(render(merged))
        return 0
    torch.set_num_threads(1)
    parts = set(args.only or ["bytes", "quality", "throughput"])
    out_path = args.out or OUT / ("logit_cache_quick.json" if args.quick else "logit_cache.json")
    results: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    results["machine"] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "bytes" in parts:
            print("part 1: bytes per token, arithmetic", flush=True)
            results["bytes_arithmetic"] = bytes_arithmetic(work / "arith", 64 if args.quick else 512)
            if args.smollm2_bytes:
                print("part 1: bytes per token, SmolLM2 / Python docs", flush=True)
                results["bytes_smollm2"] = bytes_smollm2(
                    work / "smol", 4 if args.quick else args.smollm2_blocks
                )
            out_path.write_text(json.dumps(results, indent=2))
        steps = 20 if args.quick else args.steps
        cfg = arithmetic_config(steps, 32, steps * 32, 64 if args.quick else 400)
        if "quality" in parts:
            seeds = [0] if args.quick else args.seeds
            for temperature in args.temperatures:
                print(
                    f"part 2: student quality, arithmetic, distillation temperature {temperature:g}",
                    flush=True,
                )
                tcfg = arithmetic_config(steps, 32, steps * 32, 64 if args.quick else 400, temperature)
                t_seeds = seeds if temperature == args.temperatures[0] else seeds[:1]
                results[f"quality_arithmetic_t{temperature:g}"] = quality(
                    tcfg, t_seeds, work / f"quality-{temperature:g}", only=args.variants
                )
                out_path.write_text(json.dumps(results, indent=2))
        if "throughput" in parts:
            print("part 3: throughput, arithmetic", flush=True)
            tiny = {
                "config": {
                    "model_type": "llama",
                    "hidden_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 2,
                    "intermediate_size": 64,
                    "max_position_embeddings": 256,
                    "tie_word_embeddings": True,
                }
            }
            results["throughput_arithmetic"] = {
                name: throughput(
                    cfg,
                    work / f"tp-{name}",
                    student=student,
                    steps=5 if args.quick else 20,
                    rounds=2 if args.quick else args.rounds,
                    batch_size=32,
                )
                for name, student in (("derived_half", cfg["student"]), ("tiny_1layer", tiny))
            }
            print(
                json.dumps({k: v["speedup_vs_online"] for k, v in results["throughput_arithmetic"].items()})
            )
        if args.smollm2_quality:
            keep = json.loads(args.smollm2_keep) if args.smollm2_keep.startswith("[") else args.smollm2_keep
            keep = int(keep) if isinstance(keep, str) and keep.isdigit() else keep
            print(f"part 2: student quality, SmolLM2 -> {keep} layers, {args.steps} steps", flush=True)
            scfg = smollm2_config(
                args.steps, 4, keep_layers=keep, lr=args.smollm2_lr, eval_tokens=args.smollm2_eval_tokens
            )
            results["quality_smollm2_t1"] = quality(
                scfg, args.seeds, work / "quality-smollm2", only=args.variants
            )
            out_path.write_text(json.dumps(results, indent=2))
        if args.smollm2_throughput:
            print("part 3: throughput, SmolLM2 -> 3-layer derived student, Python docs", flush=True)
            steps, batch = args.smollm2_steps, 4
            smol = {
                "kind": "lm",
                "name": "logit-cache-bench-smollm2",
                "teacher": {"source": "smollm2"},
                "student": {"keep_layers": 3},
                "data": {
                    "dataset": "python_docs",
                    "block_size": 128,
                    "prompt_tokens": 32,
                    "max_tokens": 128 * batch * (steps + 2),
                    "eval_max_tokens": 2048,
                    "eval_size": 4,
                },
                "caches": {
                    "top8": {"mode": "topk", "k": 8, "batch_size": 4},
                    "sampled12": {"mode": "sampled", "draws": 12, "batch_size": 4},
                },
                "students": [
                    {"name": "dense_online", "method": "supervised_kd"},
                    {"name": "top8_tail", "method": "supervised_kd", "cache": "top8"},
                    {"name": "sampled12", "method": "supervised_kd", "cache": "sampled12"},
                ],
                "train": {"steps": steps, "batch_size": batch, "lr": 1e-4, "progress": False},
                "threads": 1,
            }
            results["throughput_smollm2"] = throughput(
                smol,
                work / "tp-smol",
                student=smol["student"],
                steps=steps,
                rounds=args.rounds,
                batch_size=batch,
                variants=("dense_online", "top8_tail", "sampled12"),
            )
            print(json.dumps(results["throughput_smollm2"]["speedup_vs_online"]))
        if args.loss_cost:
            results["sparse_loss_cost"] = sparse_loss_cost(rounds=args.rounds)
            out_path.write_text(json.dumps(results, indent=2))
        if args.pairs_throughput:

            def save_pairs(part: dict[str, Any]) -> None:
                results["throughput_pairs"] = part
                out_path.write_text(json.dumps(results, indent=2))

            results["throughput_pairs"] = pairs_throughput(
                work, steps=args.smollm2_steps, rounds=args.rounds, save=save_pairs
            )
    out_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
