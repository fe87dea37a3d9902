"""Hugging Face causal LMs: load, build from a config, derive a smaller student, save a plain folder.

Everything here returns ordinary `transformers` objects, and `save_pretrained_folder` writes a
folder that `AutoModelForCausalLM.from_pretrained` reads without kdkit installed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# Config attributes that name the feed-forward width, by model family (Llama/Qwen/Mistral, GPT-2, OPT).
_INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """ "float32" / "bfloat16" / "float16" (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return resolved


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token its eos token as pad, without adding ids.

    Reusing eos keeps the vocabulary (and so the embedding matrix) unchanged; padded positions are
    excluded by the attention mask and by labels = -100, so the choice of id does not matter.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} has neither a pad "
                "nor an eos token; set tokenizer.pad_token before training"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local folder or a hub id (plain `from_pretrained`).

    gguf_file: a GGUF file name inside `name_or_path`; transformers dequantises it to `dtype`.
    The tokenizer gets a pad token (its eos) if it has none. The model is returned in eval mode.
    """
    model = AutoModelForCausalLM.from_pretrained(
        str(name_or_path), dtype=resolve_dtype(dtype), gguf_file=gguf_file
    )
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), gguf_file=gguf_file)
    ensure_pad_token(tokenizer)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s warning
    return model.to(device).eval(), tokenizer


def build_causal_lm(config: dict[str, Any] | PretrainedConfig, *, seed: int | None = None) -> PreTrainedModel:
    """A randomly initialised causal LM from a config object or a dict with a `model_type` key.

    e.g. build_causal_lm({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, ...})
    """
    if isinstance(config, dict):
        options = dict(config)
        model_type = options.pop("model_type", None)
        if model_type is None:
            raise ValueError("a config dict needs a 'model_type' (e.g. 'llama')")
        config = AutoConfig.for_model(model_type, **options)
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The (qualified name, ModuleList) of a decoder LM's transformer blocks.

    Found generically as the ModuleList with `config.num_hidden_layers` entries closest to the
    root: `model.layers` (Llama, Qwen, Mistral, Gemma), `transformer.h` (GPT-2), ...
    """
    count = model.config.num_hidden_layers
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no ModuleList of {count} decoder layers")
    return min(candidates, key=lambda item: item[0].count("."))


def select_layers(num_layers: int, keep_layers: Sequence[int] | str | int) -> list[int]:
    """Which teacher layers a student keeps, as sorted distinct indices in [0, num_layers).

    keep_layers: explicit indices (negative ones count from the end); "every_k:3" (layers 0, 3, 6,
    ... plus the last one, so the output layer's input is always represented); or an int n (n
    evenly spaced layers including the first and the last).
    """
    if isinstance(keep_layers, str):
        match = re.fullmatch(r"every_k:(\d+)", keep_layers.strip())
        if match is None or int(match.group(1)) < 1:
            raise ValueError(f"keep_layers={keep_layers!r}: use a list of indices, an int, or 'every_k:K'")
        step = int(match.group(1))
        chosen = set(range(0, num_layers, step)) | {num_layers - 1}
    elif isinstance(keep_layers, int):
        if not 1 <= keep_layers <= num_layers:
            raise ValueError(f"keep_layers={keep_layers} must be between 1 and {num_layers}")
        if keep_layers == 1:
            chosen = {num_layers - 1}
        else:
            chosen = {round(i * (num_layers - 1) / (keep_layers - 1)) for i in range(keep_layers)}
    else:
        chosen = set()
        for index in keep_layers:
            if not -num_layers <= index < num_layers:
                raise ValueError(f"layer {index} is out of range for a {num_layers}-layer teacher")
            chosen.add(index % num_layers)
    if not chosen:
        raise ValueError("keep_layers selects no layers")
    return sorted(chosen)


def _intermediate_key(config: PretrainedConfig) -> str:
    for key in _INTERMEDIATE_KEYS:
        if hasattr(config, key):
            return key
    raise ValueError(
        f"{type(config).__name__} has no feed-forward width attribute ({', '.join(_INTERMEDIATE_KEYS)})"
    )


def _teacher_intermediate(config: PretrainedConfig) -> int:
    value = getattr(config, _intermediate_key(config))
    # GPT-2 leaves n_inner=None to mean 4 x hidden.
    return int(value) if value is not None else 4 * int(config.hidden_size)


def student_config(
    teacher_config: PretrainedConfig, kept: Sequence[int], intermediate_size: int | None = None
) -> PretrainedConfig:
    """The teacher's config with `len(kept)` layers, per-layer lists subset, and a new MLP width."""
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    num_layers = teacher_config.num_hidden_layers
    # Per-layer lists (layer_types, sliding-window flags, ...) must follow the kept layers, or the
    # saved config fails validation / describes the wrong layers.
    for key, value in teacher_config.to_dict().items():
        if isinstance(value, list) and len(value) == num_layers and key != "architectures":
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    if intermediate_size is not None:
        setattr(config, _intermediate_key(config), int(intermediate_size))
    # A student is a plain float model even when the teacher was loaded from GGUF / a quantiser.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _mlp_keep_indices(
    layer_params: dict[str, torch.Tensor], student_shapes: dict[str, torch.Size], width: int, new_width: int
) -> torch.Tensor:
    """Indices of the `new_width` feed-forward units of one layer with the largest weight norms.

    A unit j owns row j of the up/gate projections and column j of the down projection; its score
    is the sum of those slices' L2 norms, so units that both read and write strongly are kept.
    """
    score = torch.zeros(width, dtype=torch.float64)
    for name, tensor in layer_params.items():
        for dim, (old, new) in enumerate(zip(tensor.shape, student_shapes[name])):
            if old == width and new == new_width and old != new:
                moved = tensor.detach().double().movedim(dim, 0).reshape(width, -1)
                score += moved.norm(dim=1)
    return torch.topk(score, new_width).indices.sort().values  # keep the teacher's unit order


def _slice_to(tensor: torch.Tensor, shape: torch.Size, index: torch.Tensor | None) -> torch.Tensor:
    """`tensor` cut to `shape` along every dimension that differs, using `index` (or a prefix)."""
    for dim, (old, new) in enumerate(zip(tensor.shape, shape)):
        if old != new:
            if index is not None and len(index) == new:
                tensor = tensor.index_select(dim, index.to(tensor.device))
            else:
                tensor = tensor.narrow(dim, 0, new)
    return tensor


def derive_student(
    teacher: PreTrainedModel,
    *,
    keep_layers: Sequence[int] | str | int,
    intermediate_size: int | None = None,
    copy_weights: bool = True,
    mlp_selection: str = "norm",
) -> PreTrainedModel:
    """A smaller model of the teacher's architecture: a subset of its layers, optionally narrower MLPs.

    keep_layers: see `select_layers` (a list of indices, "every_k:K", or a number of evenly spaced
        layers). Embeddings, final norm and output head are copied; kept layer i of the student
        gets teacher layer keep[i]'s weights.
    intermediate_size: a smaller feed-forward width. Each kept layer keeps the units with the
        largest weight norms (mlp_selection="norm") or simply the first ones ("first").
    copy_weights: False gives a freshly initialised model of the derived shape.
    The student is a new float model (teacher dtype) whose config has num_hidden_layers,
    per-layer lists and the MLP width updated, so it saves and reloads with plain transformers.
    """
    if mlp_selection not in ("norm", "first"):
        raise ValueError(f"mlp_selection={mlp_selection!r}: use 'norm' or 'first'")
    num_layers = teacher.config.num_hidden_layers
    kept = select_layers(num_layers, keep_layers)
    width = _teacher_intermediate(teacher.config)
    if intermediate_size is not None and not 1 <= intermediate_size <= width:
        raise ValueError(f"intermediate_size={intermediate_size} must be between 1 and the teacher's {width}")
    config = student_config(teacher.config, kept, intermediate_size)
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not copy_weights:
        return student.to(next(teacher.parameters()).device)

    prefix, _ = decoder_layers(teacher)
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    teacher_state = teacher.state_dict()
    student_shapes = {name: tensor.shape for name, tensor in student.state_dict().items()}

    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    for name, tensor in teacher_state.items():
        match = layer_key.match(name)
        if match is None:
            shared[name] = tensor
        else:
            by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = tensor

    new_state: dict[str, torch.Tensor] = {}
    for name, tensor in shared.items():
        if name in student_shapes:
            new_state[name] = tensor
    for new_index, old_index in enumerate(kept):
        params = by_layer.get(old_index, {})
        names = {suffix: f"{prefix}.{new_index}.{suffix}" for suffix in params}
        shapes = {suffix: student_shapes[full] for suffix, full in names.items() if full in student_shapes}
        index = None
        if intermediate_size is not None and intermediate_size != width and mlp_selection == "norm":
            index = _mlp_keep_indices({k: params[k] for k in shapes}, shapes, width, intermediate_size)
        for suffix, shape in shapes.items():
            new_state[names[suffix]] = _slice_to(params[suffix], shape, index).clone()

    result = student.load_state_dict(new_state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or {})
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"derived student does not match the teacher's weights: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    student.tie_weights()
    if teacher.generation_config is not None:
        student.generation_config = teacher.generation_config.__class__.from_dict(
            teacher.generation_config.to_dict()
        )
    return student.to(next(teacher.parameters()).device).train(teacher.training)


def save_pretrained_folder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: str | Path
) -> Path:
    """Write a plain Hugging Face model folder: model.safetensors + config.json (+ tokenizer files).

    The folder loads with `AutoModelForCausalLM.from_pretrained(path)` without kdkit.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
