"""Batched sampling of completions with the KV cache, returned as a training batch.

The sampling temperature / top-p here decide *which sequences* are trained on; they are separate
from the distillation temperature of the loss (a common bug elsewhere is to reuse one for both).

Samples come exactly from softmax(logits / temperature) of the model's own logits (optionally cut
to the top-p nucleus): kdkit runs its own decode loop instead of `model.generate`, so nothing of
the model's `generation_config` (repetition penalty, min_p, top_k, no-repeat n-grams, ... as an
instruct model ships them) changes the distribution. On-policy objectives (reverse KL estimates,
sampled-token advantages) need samples from p_S itself; only the EOS and pad ids are read from the
model's configs. The loop stops a row at any of the EOS ids (chat models list several), drops
finished rows from the batch and the cache, and shares one prompt prefill among the
`num_samples` completions of each prompt. Llama / Mistral / Qwen2 / Qwen3 models decode through
`kdkit.samplers.fast_decode.LeanDecoder` (the same logits from the live weights, a fraction of the
per-token overhead of the model's forward; on a CUDA device one CUDA graph replay per token,
`StaticStepDecoder`); anything it does not reproduce exactly runs the model's own forward, the
reason logged once at debug level.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.samplers.collate import build_lm_batch
from kdkit.samplers.fast_decode import (
    LeanDecoder,
    StaticStepDecoder,
    cache_length,
    lean_decoder_support,
    static_step_decoder,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How sequences are sampled. `temperature` is the *sampling* temperature (not the loss's).

    temperature: 0 means greedy decoding; else tokens are drawn from softmax(logits / temperature).
    top_p: nucleus sampling (the smallest set of tokens with probability >= top_p); 1 = off.
    eos_token_id: one id or several (a row ends at the first of any); None = the model's
        generation config, then its config (all ids of a list, as Llama-3 / Qwen chat models have).
    pad_token_id: None = the model's, else the first EOS id.
    num_samples: completions per prompt (G of group methods); they share one prompt prefill and
        come back as consecutive rows (prompt i -> rows i*G .. i*G+G-1).
    fast_decode: decode Llama / Mistral / Qwen2 / Qwen3 models with the lean decoder
        (`kdkit.samplers.fast_decode`: the same logits from the live weights, several times fewer
        ops per token); False = always the model's own forward. Unsupported models fall back anyway.
    graph_decode: how the lean decoder steps. None (default) = on a CUDA device, one CUDA graph
        replay per token (`StaticStepDecoder`: a fixed-shape step captured once and kept across sampling
        calls of the same shape (`kdkit.samplers.fast_decode.static_step_decoder`), live weights,
        finished rows kept in the static batch and ignored; removes the per-kernel launch overhead
        that dominates small models on a GPU), elsewhere the dynamic lean step (finished rows
        dropped, attention over the filled prefix only). True = the fixed-shape step on any device
        (captured on CUDA, eager elsewhere); False = never. Same samples either way (the same
        logits up to float rounding); a failed capture decodes eagerly, logged once at debug level.
    compile_decode: run the fixed-shape step through `torch.compile` where it runs eagerly (CPUs;
        CUDA devices replay a graph). Implies the fixed-shape step (graph_decode None counts as
        True; False is refused); the token draw is compiled with it. 1.3-2x the lean step's
        tokens/s for small models on a CPU, for a one-time compile per decoder shape (rows,
        bucketed cache length) at its first step: seconds to a minute, so it pays on long runs; a
        failed compile decodes eagerly, the reason logged once at debug level.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    num_samples: int = 1
    fast_decode: bool = True
    graph_decode: bool | None = None
    compile_decode: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"GenerationSettings.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"GenerationSettings.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationSettings.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"GenerationSettings.num_samples must be >= 1, got {self.num_samples}")
        if self.compile_decode and self.graph_decode is False:
            raise ValueError(
                "GenerationSettings.compile_decode compiles the fixed-shape decode step: it needs "
                "graph_decode None or True, got graph_decode=False"
            )


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, Tensor)) and not (isinstance(value, Tensor) and value.dim() > 0):
        return (int(value),)
    return tuple(int(v) for v in value)


def eos_token_ids(model: nn.Module, given: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """All end-of-sequence ids: `given`, else the model's generation config's, else its config's."""
    if given is not None:
        return _ids(given)
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids = _ids(getattr(source, "eos_token_id", None)) if source is not None else ()
        if ids:
            return ids
    return ()


def _pad_id(model: nn.Module, given: int | None, eos: tuple[int, ...]) -> int:
    if given is not None:
        return int(given)
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids = _ids(getattr(source, "pad_token_id", None)) if source is not None else ()
        if ids:
            return ids[0]
    if eos:
        return eos[0]
    raise ValueError("generation needs a pad or EOS token id (set GenerationSettings.pad_token_id)")


def completion_lengths(new_tokens: Tensor, eos_token_id: int | Sequence[int] | None) -> Tensor:
    """Per-row number of generated tokens up to and including the first EOS (any of the ids): [B] long.

    new_tokens: [B, N] generated ids. Rows without EOS keep all N tokens (truncated samples).
    """
    batch, width = new_tokens.shape
    eos = _ids(eos_token_id)
    if not eos or width == 0:
        return torch.full((batch,), width, dtype=torch.long)
    is_eos = torch.isin(new_tokens, torch.tensor(eos, device=new_tokens.device))
    first = torch.where(
        is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], width, dtype=torch.long)
    )
    return first.long().cpu()


def sample_from_logits(logits: Tensor, temperature: float, top_p: float = 1.0) -> Tensor:
    """One token per row from softmax(logits / temperature), cut to the top-p nucleus: [B] long.

    logits: [B, V] (any float dtype; computed in float32). temperature 0 = argmax. top_p < 1 keeps
    the most probable tokens whose preceding cumulative probability is below top_p (so at least one)
    and renormalises. Draws by the exponential race argmax_i p_i / E_i with E_i ~ Exp(1), which
    picks i with probability exactly p_i / Σp (and is several times cheaper than
    `torch.multinomial` for a small batch). Uses torch's global RNG.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # mass before this token already >= top_p
        sorted_p.masked_fill_(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs.div_(torch.empty_like(probs).exponential_()).argmax(-1)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class _ModelDecoder:
    """The generic decode path: any causal LM's own `forward` with its KV cache (the same API as
    `kdkit.samplers.fast_decode.LeanDecoder`; prompts left-padded)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.extra: dict[str, Any] = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        # transformers >= 5.x names the KV cache `cache` (`past_key_values` before, deprecated now).
        self.cache_key = "cache" if _accepts(model, "cache") else "past_key_values"

    def prefill(self, ids: Tensor, mask: Tensor, max_new_tokens: int, repeats: int = 1) -> Tensor:
        self.mask = mask.to(device=ids.device, dtype=torch.long)
        positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(
            input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True, **self.extra
        )
        self.cache, self.next_pos = _cache_of(out), positions[:, -1] + 1
        if repeats > 1:
            self.repeat_interleave(repeats)
            return out.logits[:, -1].repeat_interleave(repeats, 0)
        return out.logits[:, -1]

    def repeat_interleave(self, repeats: int) -> None:
        self.cache.batch_repeat_interleave(repeats)
        self.mask = self.mask.repeat_interleave(repeats, 0)
        self.next_pos = self.next_pos.repeat_interleave(repeats, 0)

    def select(self, rows: Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.next_pos = self.mask[rows], self.next_pos[rows]

    def step(self, tokens: Tensor) -> Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.next_pos[:, None],
            use_cache=True,
            **{self.cache_key: self.cache},
        )
        self.cache, self.next_pos = _cache_of(out), self.next_pos + 1
        return out.logits[:, -1]


_logged_fallbacks: set[tuple[str, str]] = set()


def _decoder(
    model: nn.Module,
    rows: int,
    width: int,
    max_new_tokens: int,
    fast: bool,
    graph_decode: bool | None,
    device: torch.device,
    compile_decode: bool = False,
) -> _ModelDecoder | LeanDecoder:
    """The lean decoder when it reproduces `model` exactly (and `fast`), else the generic one; the
    reason for a fallback is logged once per (model class, reason) at debug level. The lean decoder
    steps with a fixed shape (a CUDA graph on CUDA), kept across calls by `static_step_decoder`,
    when `graph_decode` is True, or None on a CUDA device or with `compile_decode` (see
    `GenerationSettings.graph_decode` and `.compile_decode`)."""
    if not fast:
        return _ModelDecoder(model)
    reason = lean_decoder_support(model, width + max_new_tokens)
    if reason is None:
        if graph_decode or (graph_decode is None and (device.type == "cuda" or compile_decode)):
            length = cache_length(width, max_new_tokens)
            graph = device.type == "cuda"
            return static_step_decoder(model, rows, length, device, graph=graph, compile=compile_decode)
        return LeanDecoder(model)
    key = (type(model).__name__, reason)
    if key not in _logged_fallbacks:
        _logged_fallbacks.add(key)
        logger.debug("kdkit sampling: generic decode loop for %s: %s", type(model).__name__, reason)
    return _ModelDecoder(model)


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_attention_mask: Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    num_samples: int = 1,
    fast: bool = True,
    graph_decode: bool | None = None,
    compile_decode: bool = False,
) -> Tensor:
    """Sample completions with the KV cache: [B * num_samples, steps] long, `pad_token_id` after EOS.

    prompt_ids, prompt_attention_mask: [B, P], left-padded. steps <= max_new_tokens (the loop ends
    when every row has produced an EOS). The prompt is run once (prefill) and its cache repeated for
    the `num_samples` completions of each prompt; a finished row leaves the batch and the cache, so
    later decode steps cost only the rows still running. Each token is drawn from
    `sample_from_logits(logits, temperature, top_p)`; no other logits processing is applied.
    fast: decode Llama / Mistral / Qwen2 / Qwen3 models with `kdkit.samplers.fast_decode.LeanDecoder`
    (the same logits, several times fewer ops per step, the live weights); other models, or
    fast=False, run the model's own forward. graph_decode: None = its decode steps replay a CUDA
    graph on CUDA devices (`StaticStepDecoder`, kept with its graph across calls of the same
    shape: `static_step_decoder`; the prompts are left-padded to its bucketed cache length), True =
    the fixed-shape step on any device, False = the dynamic lean step
    (`GenerationSettings.graph_decode`). compile_decode: the fixed-shape step through
    `torch.compile` where no graph runs it (`GenerationSettings.compile_decode`).
    """
    batch, width = prompt_ids.shape
    device = prompt_ids.device
    if width and not bool(prompt_attention_mask[:, -1].all()):
        raise ValueError(
            "sample_tokens: prompts must be left-padded (every row's last prompt_attention_mask "
            "column is 1); collate prompts with kdkit.samplers.PromptCompletionCollator"
        )
    rows = batch * num_samples
    if compile_decode and graph_decode is False:
        raise ValueError(
            "sample_tokens: compile_decode needs the fixed-shape step (graph_decode None or True)"
        )
    decoder = _decoder(model, rows, width, max_new_tokens, fast, graph_decode, device, compile_decode)
    if isinstance(decoder, StaticStepDecoder):  # its cache length is bucketed: left-pad the prompts to it
        extra = cache_length(width, max_new_tokens) - width - max_new_tokens
        prompt_ids = torch.nn.functional.pad(prompt_ids, (extra, 0), value=pad_token_id)
        prompt_attention_mask = torch.nn.functional.pad(prompt_attention_mask, (extra, 0), value=0)
    # one prefill shared by the G samples of each prompt
    logits = decoder.prefill(prompt_ids, prompt_attention_mask, max_new_tokens, repeats=num_samples)
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    if isinstance(decoder, StaticStepDecoder):
        return _sample_whole_batch(decoder, logits, tokens, eos, temperature, top_p, pad_token_id)
    active = torch.arange(rows, device=device)  # full-batch row of each cache row
    steps = 0
    for step in range(max_new_tokens):
        chosen = sample_from_logits(logits, temperature, top_p)
        tokens[active, step] = chosen
        steps = step + 1
        if step == max_new_tokens - 1:
            break
        if eos.numel():
            running = ~torch.isin(chosen, eos)
            if not bool(running.all()):
                keep = running.nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                decoder.select(keep)
                active, chosen = active[keep], chosen[keep]
        logits = decoder.step(chosen)
    return tokens[:, :steps]


# How often the fixed-shape loop asks a CUDA device whether every row has ended. Each ask waits for
# the GPU, after which the CPU has nothing queued; between asks it queues replays ahead of the GPU.
# (Other devices are asked at every step: the answer is at hand, and a step not run is time saved.)
EOS_CHECK_EVERY = 8


def _sample_whole_batch(
    decoder: StaticStepDecoder,
    logits: Tensor,
    tokens: Tensor,
    eos: Tensor,
    temperature: float,
    top_p: float,
    pad_token_id: int,
) -> Tensor:
    """`sample_tokens`' loop for the fixed-shape step: no row leaves the batch (the graph's shapes
    are fixed), so rows past their EOS are fed and given `pad_token_id` and nothing is read back
    from a CUDA device but every `EOS_CHECK_EVERY` steps. Returns tokens cut to the width the
    row-dropping loop returns (up to the step where the last row ended)."""
    max_new_tokens = tokens.shape[1]
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    column = torch.zeros(1, dtype=torch.long, device=tokens.device)  # the compiled draw's column
    check_every = EOS_CHECK_EVERY if tokens.device.type == "cuda" else 1
    steps = 0
    for step in range(max_new_tokens):
        steps = step + 1
        last = step == max_new_tokens - 1
        if decoder.compiles and not last:  # the draw and the decode step as one compiled call
            column.fill_(step)
            decoder.begin_step()
            args = (decoder, logits, tokens, done, column, eos, temperature, top_p, pad_token_id)
            logits = decoder.run_compiled(_draw_then_step, *args)
        else:
            chosen = sample_from_logits(logits, temperature, top_p).masked_fill_(done, pad_token_id)
            tokens[:, step] = chosen
            if last:
                break
            if eos.numel():
                done |= torch.isin(chosen, eos)
            logits = decoder.step(chosen)
        if eos.numel() and steps % check_every == 0 and bool(done.all()):
            break
    if eos.numel():
        steps = int(completion_lengths(tokens[:, :steps], eos.tolist()).max())
    return tokens[:, :steps]


def _draw_then_step(
    decoder: StaticStepDecoder,
    logits: Tensor,
    tokens: Tensor,
    done: Tensor,
    column: Tensor,
    eos: Tensor,
    temperature: float,
    top_p: float,
    pad_token_id: int,
) -> Tensor:
    """One iteration of `_sample_whole_batch` as one function, for `torch.compile` to make one call
    of it (`StaticStepDecoder.run_compiled`): a token per row drawn from logits [B, V]
    (`pad_token_id` for rows that ended), written into tokens [B, max_new_tokens] at column [1];
    rows that drew an EOS marked in done [B]; then the decoder's fixed-shape step on the tokens
    drawn (every row: the loop keeps the whole batch). Returns the next logits [B, V]."""
    chosen = sample_from_logits(logits, temperature, top_p).masked_fill_(done, pad_token_id)
    tokens.index_copy_(1, column, chosen[:, None])
    if eos.numel():
        done |= torch.isin(chosen, eos)
    decoder.tokens.copy_(chosen)
    return decoder._fixed_step()


def repeat_rows(batch: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Every tensor of `batch` with a batch dim, each row repeated `repeats` times consecutively.

    For fields that must follow `num_samples` completions per prompt (e.g. a dataset's answers).
    """
    if repeats == 1:
        return dict(batch)
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0}
    if len(sizes) > 1:
        raise ValueError(f"repeat_rows: tensors with different batch sizes {sorted(sizes)}")
    return {
        k: v.repeat_interleave(repeats, 0) if isinstance(v, Tensor) and v.dim() > 0 else v
        for k, v in batch.items()
    }


def generate_batch(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_attention_mask: Tensor,
    settings: GenerationSettings,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Sample completions of (left-padded) prompts and build a right-padded training batch.

    prompt_ids, prompt_attention_mask: [B, P]. Returns (batch, info): batch has input_ids /
    attention_mask / labels [B·G, T] (G = settings.num_samples; labels = generated tokens up to and
    including the first EOS, -100 on the prompt and after EOS) plus the prompt tensors (rows
    repeated G times); info has "generation_s" (wall seconds), "new_tokens" (trained completion
    tokens) and "truncated" (rows without EOS). Sampling uses kdkit's settings only
    (`sample_tokens`), never the model's generation_config. The model is switched to eval mode for
    sampling (no dropout) and restored afterwards.
    """
    eos = eos_token_ids(model, settings.eos_token_id)
    pad = _pad_id(model, settings.pad_token_id, eos)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        new_tokens = sample_tokens(
            model,
            prompt_ids,
            prompt_attention_mask,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens,
            eos_token_ids=eos,
            pad_token_id=pad,
            num_samples=settings.num_samples,
            fast=settings.fast_decode,
            graph_decode=settings.graph_decode,
            compile_decode=settings.compile_decode,
        )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    g = settings.num_samples
    prompt_ids = prompt_ids.repeat_interleave(g, 0) if g > 1 else prompt_ids
    prompt_attention_mask = prompt_attention_mask.repeat_interleave(g, 0) if g > 1 else prompt_attention_mask
    # The batch is laid out on the host from one copy of each tensor (on a GPU, row-by-row reads
    # would each wait for it), then copied back in one go.
    device = prompt_ids.device
    host_tokens = new_tokens.cpu()
    lengths = completion_lengths(host_tokens, eos)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids.cpu(), prompt_attention_mask.cpu())]
    completions = [row[:n].tolist() for row, n in zip(host_tokens, lengths.tolist())]
    batch = build_lm_batch(prompts, completions, pad)
    if device.type == "cuda":
        batch = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    else:
        batch = {k: v.to(device) for k, v in batch.items()}
    batch["prompt_ids"], batch["prompt_attention_mask"] = prompt_ids, prompt_attention_mask
    if eos:
        has_eos = torch.isin(host_tokens, torch.tensor(eos)).any(1)
    else:
        has_eos = torch.zeros(len(lengths), dtype=torch.bool)
    info = {"generation_s": seconds, "new_tokens": int(lengths.sum()), "truncated": int((~has_eos).sum())}
    return batch, info
