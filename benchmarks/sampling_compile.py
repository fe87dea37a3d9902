"""Does a static KV cache + `torch.compile`d decode step speed up sampling on CPU? (an experiment)

The arithmetic student (recipes/arithmetic-policies.yaml: 3 layers, width 64, MLP 48) samples 32
completions of up to 48 tokens three ways, each timed 3 times after a first call:

- ``dynamic_kdkit``: `kdkit.samplers.generation.sample_tokens` (dynamic cache, finished rows dropped);
- ``eager_static``: the same loop on a `StaticCache` (fixed shapes, no row dropping), eager;
- ``compiled_static``: that loop with the decode step compiled (`torch.compile(dynamic=False)`).

The first call of ``compiled_static`` includes compilation. Result on the loaded 2-core machine
(docs/benchmarks/sampling.md): compilation ~300 s, then ~1.02-1.10 s per batch vs 1.22-1.42 s for
the dynamic loop; so kdkit keeps compilation off by default on CPU.

``--lean``: instead, `torch.compile(LeanDecoder.step, dynamic=True)` (kdkit's default decoder):
the time of the first compiled call, of the next ones, and of the eager step.

    .venv/bin/python benchmarks/sampling_compile.py          # ~6 min on a shared 2-core CPU
    .venv/bin/python benchmarks/sampling_compile.py --lean   # a few minutes
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import StaticCache

from kdkit.models.lm import derive_student
from kdkit.pipelines.teachers import get_arithmetic_teacher
from kdkit.samplers import PromptCompletionCollator
from kdkit.samplers.generation import sample_from_logits, sample_tokens
from kdkit.tasks.arithmetic import arithmetic_dataset


def lean(student, ids, mask) -> None:  # type: ignore[no-untyped-def]
    """Eager vs compiled `LeanDecoder.step` on the same cache (steps of a 32-row batch)."""
    from kdkit.samplers.fast_decode import LeanDecoder

    decoder = LeanDecoder(student)
    with torch.no_grad():
        token = decoder.prefill(ids, mask, 48).argmax(-1)
        start = time.perf_counter()
        for _ in range(10):
            decoder.step(token)
        print(f"eager step: {(time.perf_counter() - start) / 10 * 1e3:.2f} ms", flush=True)
        decoder.prefill(ids, mask, 48)
        compiled = torch.compile(decoder.step, dynamic=True)
        for call in range(3):
            start = time.perf_counter()
            compiled(token)
            print(f"compiled step, call {call + 1}: {time.perf_counter() - start:.2f} s", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    teacher, tokenizer, _ = get_arithmetic_teacher()
    student = derive_student(teacher, keep_layers=3, intermediate_size=48).eval()
    prompts = PromptCompletionCollator(tokenizer)(arithmetic_dataset(32, (1, 3), seed=0))
    ids, mask = prompts["prompt_ids"], prompts["prompt_attention_mask"]
    if "--lean" in sys.argv[1:]:
        lean(student, ids, mask)
        return
    batch, width = ids.shape
    new, eos = 48, tokenizer.eos_token_id

    def decode(tokens, attention, positions, cache, cache_position):  # type: ignore[no-untyped-def]
        return student(
            input_ids=tokens,
            attention_mask=attention,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            cache_position=cache_position,
        ).logits[:, -1]

    def static_loop(step) -> torch.Tensor:  # type: ignore[no-untyped-def]
        cache = StaticCache(config=student.config, max_cache_len=width + new)
        attention = torch.zeros(batch, width + new, dtype=torch.long)
        attention[:, :width] = mask
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            out = student(
                input_ids=ids,
                attention_mask=attention[:, :width],
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                cache_position=torch.arange(width),
            )
            logits, next_pos = out.logits[:, -1], positions[:, -1:] + 1
            chosen, done = [], torch.zeros(batch, dtype=torch.bool)
            for i in range(new):
                token = torch.where(
                    done, torch.zeros_like(done, dtype=torch.long), sample_from_logits(logits, 1.0)
                )
                chosen.append(token)
                done |= token == eos
                if bool(done.all()) or i == new - 1:
                    break
                attention[:, width + i] = 1
                logits = step(token[:, None], attention, next_pos, cache, torch.tensor([width + i]))
                next_pos = next_pos + 1
        return torch.stack(chosen, 1)

    compiled = torch.compile(decode, dynamic=False)
    runs = {
        "eager_static": lambda: static_loop(decode),
        "dynamic_kdkit": lambda: sample_tokens(student, ids, mask, max_new_tokens=new, eos_token_ids=(eos,)),
        "compiled_static": lambda: static_loop(compiled),
    }
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        times = []
        for seed in range(3):
            torch.manual_seed(seed)
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        print(f"{name}: first call {first:.2f} s, then {', '.join(f'{t:.3f}' for t in times)} s", flush=True)


if __name__ == "__main__":
    main()
