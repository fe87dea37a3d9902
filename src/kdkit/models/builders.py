"""Build a student from a teacher: keep a subset of layers, shrink feed-forward widths, or factorise
every linear layer W ≈ U·V by truncated SVD to meet a parameter budget — initialised from the teacher.

Three entry points:

- `derive_student(teacher, keep_layers=..., intermediate_size=...)`: any Hugging Face model
  (encoders such as BERT/MiniLM, decoders such as Llama/GPT-2, with or without a task head). The
  result is a plain `transformers` model of the teacher's class: `save_pretrained` writes a folder
  that `from_pretrained` reloads without kdkit.
- `select_module_layers(module, keep_layers, layers="blocks")`: the same for a plain torch module
  whose blocks sit in one `nn.ModuleList`.
- `factorize(model, budget=0.5)`: replaces `nn.Linear` (and, by default, the input embedding
  matrix) by `LowRankLinear` / `LowRankEmbedding` with per-layer ranks chosen so the whole model
  has at most `budget` parameters. `save_student` / `load_student` store it as safetensors plus a
  small JSON (`kdkit_lowrank.json`, format below); `merge_lowrank` turns it back into dense layers
  (same function, plain architecture) when a kdkit-free export matters more than speed.

`kdkit_lowrank.json` (format "kdkit.lowrank", version 1)::

    {"format": "kdkit.lowrank", "version": 1,
     "architecture": "BertForSequenceClassification",     # class of the dense model
     "layers": {"bert.encoder.layer.0.attention.self.query":
                    {"type": "linear", "in_features": 384, "out_features": 384, "rank": 96, "bias": true},
                "bert.embeddings.word_embeddings":
                    {"type": "embedding", "num_embeddings": 30522, "embedding_dim": 384, "rank": 64,
                     "padding_idx": 0}}}

A factorised linear layer `name` has parameters `name.first.weight` [rank, in] (V) and
`name.second.weight` [out, rank] (U, with `name.second.bias` [out]); y = U·(V·x) + b. A
factorised embedding has `name.first.weight` [num_embeddings, rank] and `name.second.weight`
[embedding_dim, rank]; e(i) = U·A[i]. The dense model's config is `config.json` beside it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

LOWRANK_FILE = "kdkit_lowrank.json"
LOWRANK_FORMAT = "kdkit.lowrank"

# Config attributes that name the feed-forward width, by model family (BERT/Llama/Qwen, GPT-2, OPT).
_INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim")


# ----------------------------------------------------------------------------------------------
# Layer selection


def select_layers(num_layers: int, keep_layers: Sequence[int] | str | int) -> list[int]:
    """Which teacher layers a student keeps, as sorted distinct indices in [0, num_layers).

    keep_layers: explicit indices (negative ones count from the end); "every_k:3" (layers 0, 3, 6,
    ... plus the last one, so the output layer's input is always represented); "last:2" (the last
    k layers); or an int n (n evenly spaced layers including the first and the last).
    """
    if isinstance(keep_layers, str):
        spec = keep_layers.strip()
        match = re.fullmatch(r"(every_k|last):(\d+)", spec)
        if match is None or int(match.group(2)) < 1:
            raise ValueError(
                f"keep_layers={keep_layers!r}: use a list of indices, an int, 'every_k:K' or 'last:K'"
            )
        k = int(match.group(2))
        if match.group(1) == "every_k":
            chosen = set(range(0, num_layers, k)) | {num_layers - 1}
        else:
            if k > num_layers:
                raise ValueError(f"keep_layers={keep_layers!r}: the teacher has only {num_layers} layers")
            chosen = set(range(num_layers - k, num_layers))
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


def layer_stack(model: nn.Module, name: str | None = None) -> tuple[str, nn.ModuleList]:
    """The (qualified name, ModuleList) of a model's repeated blocks.

    name: the ModuleList's qualified name ("encoder.layer", "blocks"); if None, the ModuleList with
    `config.num_hidden_layers` entries closest to the root (Hugging Face models: `bert.encoder.layer`,
    `model.layers`, `transformer.h`), or for a plain module the only ModuleList closest to the root.
    """
    modules = dict(model.named_modules())
    if name is not None:
        found = modules.get(name)
        if not isinstance(found, nn.ModuleList):
            lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
            raise ValueError(
                f"{type(model).__name__} has no ModuleList named {name!r} "
                f"(ModuleLists: {', '.join(lists) or 'none'})"
            )
        return name, found
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (qual, module)
        for qual, module in modules.items()
        if isinstance(module, nn.ModuleList) and (count is None or len(module) == count)
    ]
    if not candidates:
        what = f"of {count} layers" if count is not None else ""
        raise ValueError(f"{type(model).__name__} has no ModuleList {what}; pass the layer stack's name")
    depth = min(qual.count(".") for qual, _ in candidates)
    top = [item for item in candidates if item[0].count(".") == depth]
    if len(top) > 1 and count is None:
        raise ValueError(
            f"{type(model).__name__} has several ModuleLists ({', '.join(q for q, _ in top)}); "
            "pass the layer stack's name"
        )
    return top[0]


def _intermediate_key(config: Any) -> str:
    for key in _INTERMEDIATE_KEYS:
        if hasattr(config, key):
            return key
    raise ValueError(
        f"{type(config).__name__} has no feed-forward width attribute ({', '.join(_INTERMEDIATE_KEYS)})"
    )


def teacher_intermediate(config: Any) -> int:
    """The feed-forward width of a Hugging Face config (GPT-2's n_inner=None means 4 × hidden)."""
    value = getattr(config, _intermediate_key(config))
    return int(value) if value is not None else 4 * int(config.hidden_size)


def student_config(teacher_config: Any, kept: Sequence[int], intermediate_size: int | None = None) -> Any:
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
    layer_params: dict[str, Tensor], student_shapes: dict[str, torch.Size], width: int, new_width: int
) -> Tensor:
    """Indices of the `new_width` feed-forward units of one layer with the largest weight norms.

    A unit j owns row j of the up/gate projections and column j of the down projection; its score
    is the sum of those slices' L2 norms, so units that both read and write strongly are kept.
    """
    score = torch.zeros(width, dtype=torch.float64)
    for name, tensor in layer_params.items():
        for dim, (old, new) in enumerate(zip(tensor.shape, student_shapes[name])):
            if old == width and new == new_width and old != new:
                moved = tensor.detach().double().movedim(dim, 0).reshape(width, -1)
                score += moved.norm(dim=1).cpu()
    return torch.topk(score, new_width).indices.sort().values  # keep the teacher's unit order


def _slice_to(tensor: Tensor, shape: torch.Size, index: Tensor | None) -> Tensor:
    """`tensor` cut to `shape` along every dimension that differs, using `index` (or a prefix)."""
    for dim, (old, new) in enumerate(zip(tensor.shape, shape)):
        if old != new:
            if index is not None and len(index) == new:
                tensor = tensor.index_select(dim, index.to(tensor.device))
            else:
                tensor = tensor.narrow(dim, 0, new)
    return tensor


def derive_student(
    teacher: nn.Module,
    *,
    keep_layers: Sequence[int] | str | int,
    intermediate_size: int | None = None,
    copy_weights: bool = True,
    mlp_selection: str = "norm",
    seed: int | None = None,
) -> Any:
    """A smaller Hugging Face model of the teacher's class: a subset of its layers, narrower MLPs.

    teacher: any `PreTrainedModel` with `config.num_hidden_layers` blocks in one ModuleList —
        encoders (BertModel, BertForSequenceClassification, ...) and decoders (LlamaForCausalLM,
        GPT2LMHeadModel, ...).
    keep_layers: see `select_layers` (indices, "every_k:K", "last:K", or a number of evenly spaced
        layers). Embeddings, final norm, pooler and heads are copied; kept layer i of the student
        gets teacher layer keep[i]'s weights.
    intermediate_size: a smaller feed-forward width. Each kept layer keeps the units with the
        largest weight norms (mlp_selection="norm") or simply the first ones ("first").
    copy_weights: False gives a freshly initialised model of the derived shape (a from-scratch
        baseline of the same size; `seed` makes its initialisation reproducible).
    The student's config has num_hidden_layers, per-layer lists and the MLP width updated, so
    `save_pretrained` + `from_pretrained` round-trips without kdkit.
    """
    if mlp_selection not in ("norm", "first"):
        raise ValueError(f"mlp_selection={mlp_selection!r}: use 'norm' or 'first'")
    if not hasattr(teacher, "config") or not hasattr(teacher.config, "num_hidden_layers"):
        raise TypeError(
            f"derive_student wants a Hugging Face model; for a plain torch module ({type(teacher).__name__}) "
            "use select_module_layers"
        )
    num_layers = teacher.config.num_hidden_layers
    kept = select_layers(num_layers, keep_layers)
    width = teacher_intermediate(teacher.config)
    if intermediate_size is not None and not 1 <= intermediate_size <= width:
        raise ValueError(f"intermediate_size={intermediate_size} must be between 1 and the teacher's {width}")
    config = student_config(teacher.config, kept, intermediate_size)
    first = next(teacher.parameters())
    if seed is not None:
        torch.manual_seed(seed)
    student = teacher.__class__._from_config(config, dtype=first.dtype)
    if not copy_weights:
        return student.to(first.device)

    prefix, _ = layer_stack(teacher)
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    student_shapes = {name: tensor.shape for name, tensor in student.state_dict().items()}

    by_layer: dict[int, dict[str, Tensor]] = {}
    shared: dict[str, Tensor] = {}
    for name, tensor in teacher.state_dict().items():
        match = layer_key.match(name)
        if match is None:
            shared[name] = tensor
        else:
            by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = tensor

    new_state = {name: tensor for name, tensor in shared.items() if name in student_shapes}
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
    generation = getattr(teacher, "generation_config", None)
    if generation is not None and getattr(student, "generation_config", None) is not None:
        student.generation_config = generation.__class__.from_dict(generation.to_dict())
    return student.to(first.device).train(teacher.training)


def _reset_parameters(module: nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def select_module_layers(
    module: nn.Module,
    keep_layers: Sequence[int] | str | int,
    *,
    layers: str | None = None,
    copy_weights: bool = True,
) -> nn.Module:
    """A copy of a plain torch module keeping a subset of the blocks in one of its ModuleLists.

    layers: the ModuleList's qualified name (see `layer_stack`; found automatically when there is
    one ModuleList closest to the root). The module's forward must loop over that list (as
    `for block in self.blocks: x = block(x)` does); code that indexes fixed positions breaks.
    copy_weights=False re-initialises every submodule with a `reset_parameters` method.
    """
    student = copy.deepcopy(module)
    name, stack = layer_stack(student, layers)
    kept = select_layers(len(stack), keep_layers)
    new_stack = nn.ModuleList([stack[i] for i in kept])
    parent_name, _, attr = name.rpartition(".")
    parent = student.get_submodule(parent_name) if parent_name else student
    setattr(parent, attr, new_stack)
    if not copy_weights:
        _reset_parameters(student)
    return student


# ----------------------------------------------------------------------------------------------
# Low-rank factorisation


def _svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """W [out, in] ≈ U_r·V_r with U_r = U·√S [out, r], V_r = √S·Vh [r, in] (balanced split)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


class LowRankLinear(nn.Module):
    """y = U·(V·x) + b: a linear map of rank ≤ `rank` with r·(in + out) (+ out) parameters.

    x: [..., in_features] -> [..., out_features]. `first` is V ([rank, in], no bias), `second` is
    U ([out, rank]) with the bias. `from_linear` initialises it from a dense layer by truncated SVD:
    at rank = min(in, out) it reproduces the dense layer up to float rounding.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank {rank} must be between 1 and min(in, out) = {min(in_features, out_features)}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        module = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
        ).to(linear.weight.device)
        u, v = _svd_factors(linear.weight, rank)
        with torch.no_grad():
            module.first.weight.copy_(v)
            module.second.weight.copy_(u)
            if linear.bias is not None:
                module.second.bias.copy_(linear.bias)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def to_linear(self) -> nn.Linear:
        """The equivalent dense layer, weight U·V."""
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.second.bias is not None,
            dtype=self.first.weight.dtype,
        ).to(self.first.weight.device)
        with torch.no_grad():
            dense.weight.copy_(self.second.weight @ self.first.weight)
            if self.second.bias is not None:
                dense.bias.copy_(self.second.bias)
        return dense

    def describe(self) -> dict[str, Any]:
        return {
            "type": "linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.second.bias is not None,
        }

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankEmbedding(nn.Module):
    """e(i) = U·A[i]: an embedding table factorised as A [num, rank] then U [dim, rank] (ALBERT-style).

    ids: [...] int64 -> [..., embedding_dim]. `from_embedding` initialises it by truncated SVD of
    the dense table. The padding row of A is kept as the SVD gives it (the dense padding row).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        *,
        padding_idx: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(num_embeddings, embedding_dim):
            raise ValueError(f"rank {rank} must be between 1 and {min(num_embeddings, embedding_dim)}")
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.first = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx, dtype=dtype)
        self.second = nn.Linear(rank, embedding_dim, bias=False, dtype=dtype)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, rank: int) -> LowRankEmbedding:
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            rank,
            padding_idx=embedding.padding_idx,
            dtype=embedding.weight.dtype,
        ).to(embedding.weight.device)
        table, proj = _svd_factors(embedding.weight, rank)  # [num, r], [r, dim]
        with torch.no_grad():
            module.first.weight.copy_(table)
            module.second.weight.copy_(proj.T)
        return module

    def forward(self, ids: Tensor) -> Tensor:
        return self.second(self.first(ids))

    def to_embedding(self) -> nn.Embedding:
        dense = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            dtype=self.first.weight.dtype,
        ).to(self.first.weight.device)
        with torch.no_grad():
            dense.weight.copy_(self.first.weight @ self.second.weight.T)
        return dense

    def describe(self) -> dict[str, Any]:
        return {
            "type": "embedding",
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "rank": self.rank,
            "padding_idx": self.padding_idx,
        }


LOWRANK_TYPES = (LowRankLinear, LowRankEmbedding)


@dataclass
class _Candidate:
    """One dense matrix that may be factorised: rows × cols, extra = bias parameters."""

    name: str
    module: nn.Module
    rows: int
    cols: int
    extra: int
    spectrum: Tensor | None = None  # squared singular values / ‖W‖², descending (energy allocation)

    @property
    def dense(self) -> int:
        return self.rows * self.cols + self.extra

    @property
    def max_rank(self) -> int:
        """The largest rank that still saves parameters: r·(rows + cols) < rows·cols."""
        return max(0, math.ceil(self.rows * self.cols / (self.rows + self.cols)) - 1)

    def cost(self, rank: int) -> int:
        return rank * (self.rows + self.cols) + self.extra if rank > 0 else self.dense


@dataclass
class BuildReport:
    """What a builder produced. parameters: counts (tied tensors once); flops: forward FLOPs on the
    example input (torch's FlopCounterMode: matmuls, convolutions, attention), None without one."""

    teacher_parameters: int
    student_parameters: int
    budget: int | None = None
    teacher_flops: int | None = None
    student_flops: int | None = None
    ranks: dict[str, int] = field(default_factory=dict)

    @property
    def parameter_ratio(self) -> float:
        return self.student_parameters / self.teacher_parameters

    @property
    def expected_speedup(self) -> float | None:
        """teacher FLOPs / student FLOPs on the example input (the speed-up if compute-bound)."""
        if not self.teacher_flops or not self.student_flops:
            return None
        return self.teacher_flops / self.student_flops

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["parameter_ratio"] = self.parameter_ratio
        out["expected_speedup"] = self.expected_speedup
        return out


def _parameters(model: nn.Module) -> int:
    """Parameters, tied (shared) tensors once (as kdkit.eval.count_parameters, without the import)."""
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, example: Tensor | Mapping[str, Any]) -> int:
    """FLOPs of one forward pass on `example` (tensor -> model(x), dict -> model(**x)), counted by
    torch.utils.flop_counter (matrix multiplies, convolutions, attention; elementwise ops are free)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**example) if isinstance(example, Mapping) else model(example)
    return int(counter.get_total_flops())


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters that appear under more than one module (tied embeddings / heads)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(pattern, name) for pattern in patterns)


def _candidates(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str], embeddings: bool, min_rank: int
) -> list[_Candidate]:
    tied = _tied_parameter_ids(model)
    out = []
    for name, module in model.named_modules():
        if not name or (include is not None and not _matches(name, include)) or _matches(name, exclude):
            continue
        if type(module) is nn.Linear and id(module.weight) not in tied:
            extra = module.out_features if module.bias is not None else 0
            cand = _Candidate(name, module, module.out_features, module.in_features, extra)
        elif embeddings and type(module) is nn.Embedding and id(module.weight) not in tied:
            cand = _Candidate(name, module, module.num_embeddings, module.embedding_dim, 0)
        else:
            continue
        if cand.max_rank >= min_rank:  # a layer too small to save anything stays dense
            out.append(cand)
    return out


def _uniform_ranks(candidates: list[_Candidate], available: int, min_rank: int) -> dict[str, int]:
    """Largest fraction f with every layer at rank max(min_rank, ⌊f·max_rank⌋) fitting `available`."""

    def ranks_at(f: float) -> dict[str, int]:
        return {c.name: max(min_rank, math.floor(f * c.max_rank)) for c in candidates}

    def total(ranks: dict[str, int]) -> int:
        return sum(c.cost(ranks[c.name]) for c in candidates)

    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        if total(ranks_at(mid)) <= available:
            low = mid
        else:
            high = mid
    return ranks_at(low)


def _energy_ranks(candidates: list[_Candidate], available: int, min_rank: int) -> dict[str, int]:
    """Greedy: add singular directions in order of relative energy (σ²/‖W‖²) per parameter."""
    ranks = {c.name: min_rank for c in candidates}
    spent = sum(c.cost(min_rank) for c in candidates)
    heap = []
    for c in candidates:
        assert c.spectrum is not None
        for k in range(min_rank, c.max_rank):
            heap.append((float(c.spectrum[k]) / (c.rows + c.cols), k, c))
    heap.sort(key=lambda item: -item[0])
    for _, k, c in heap:  # within one layer the benefit is descending, so ranks grow in order
        step = c.rows + c.cols
        if ranks[c.name] == k and spent + step <= available:
            ranks[c.name] = k + 1
            spent += step
    return ranks


def factorize(
    model: nn.Module,
    budget: float | int,
    *,
    allocation: Literal["uniform", "energy"] = "uniform",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    embeddings: bool = True,
    min_rank: int = 1,
    example: Tensor | Mapping[str, Any] | None = None,
    copy_weights: bool = True,
    seed: int | None = None,
) -> tuple[nn.Module, BuildReport]:
    """A copy of `model` with its linear layers (and input embedding tables) factorised by truncated
    SVD, ranks chosen per layer so the copy has at most `budget` parameters.

    budget: a fraction of the teacher's parameters in (0, 1] (0.5 = half) or an absolute count (> 1).
    allocation: "uniform" compresses every layer by the same fraction of its break-even rank
        (the largest rank that still saves parameters); "energy" adds singular directions greedily,
        those with the largest share of their layer's squared Frobenius norm per parameter first.
    include / exclude: regular expressions on module names (searched, not full-matched);
        e.g. exclude=("classifier",). Tied weights (an LM head sharing the embedding) stay dense, as
        do layers too small to save anything at `min_rank`.
    embeddings: factorise `nn.Embedding` tables too — for small encoders such as MiniLM the word
        embeddings are half the parameters, so a 50% budget is unreachable without them.
    example: an input batch; when given, the report holds forward FLOPs of teacher and student.
    copy_weights=False: same factorised shapes, freshly initialised (a from-scratch baseline).
    Returns (student, BuildReport). Raises ValueError naming the floor when the budget is unreachable.
    """
    teacher_params = _parameters(model)
    target = int(round(budget * teacher_params)) if budget <= 1 else int(budget)
    if target <= 0:
        raise ValueError(f"budget={budget} gives no parameters")
    student = copy.deepcopy(model)
    candidates = _candidates(student, include, exclude, embeddings, min_rank)
    if not candidates:
        raise ValueError("no linear or embedding layer to factorise (check include/exclude)")
    fixed = teacher_params - sum(c.dense for c in candidates)
    floor = fixed + sum(c.cost(min_rank) for c in candidates)
    if target < floor:
        raise ValueError(
            f"a budget of {target:,} parameters is unreachable by factorisation: the layers that stay "
            f"dense hold {fixed:,} and every factorised layer at rank {min_rank} adds {floor - fixed:,} "
            f"(minimum {floor:,} = {floor / teacher_params:.1%} of the teacher); remove layers first "
            "(derive_student) or raise the budget"
        )
    if allocation == "energy":
        for c in candidates:
            weight = c.module.weight.detach().double()
            s2 = torch.linalg.svdvals(weight).square()
            c.spectrum = (s2 / s2.sum().clamp_min(1e-300)).cpu()
        ranks = _energy_ranks(candidates, target - fixed, min_rank)
    elif allocation == "uniform":
        ranks = _uniform_ranks(candidates, target - fixed, min_rank)
    else:
        raise ValueError(f"allocation={allocation!r}: use 'uniform' or 'energy'")

    if seed is not None:
        torch.manual_seed(seed)
    for c in candidates:
        rank = ranks[c.name]
        if isinstance(c.module, nn.Linear):
            new: nn.Module = LowRankLinear.from_linear(c.module, rank)
        else:
            new = LowRankEmbedding.from_embedding(c.module, rank)
        if not copy_weights:
            _reset_parameters(new)
        _set_submodule(student, c.name, new)
    report = BuildReport(teacher_params, _parameters(student), budget=target, ranks=ranks)
    if report.student_parameters > target:  # cannot happen by construction; guards the arithmetic
        raise AssertionError(f"factorised student has {report.student_parameters} > budget {target}")
    if example is not None:
        report.teacher_flops = forward_flops(model, example)
        report.student_flops = forward_flops(student, example)
    return student, report


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def lowrank_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: description} of every LowRankLinear / LowRankEmbedding in `model`."""
    return {name: m.describe() for name, m in model.named_modules() if isinstance(m, LOWRANK_TYPES)}


def merge_lowrank(model: nn.Module) -> nn.Module:
    """A copy with every low-rank layer replaced by the equivalent dense layer (weight U·V).

    The result has the original architecture, so a Hugging Face model saves with `save_pretrained`
    and reloads without kdkit; it computes the same function but loses the factorised speed-up.
    """
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LowRankLinear):
            _set_submodule(merged, name, module.to_linear())
        elif isinstance(module, LowRankEmbedding):
            _set_submodule(merged, name, module.to_embedding())
    return merged


def _apply_layout(model: nn.Module, layers: Mapping[str, Mapping[str, Any]]) -> None:
    modules = dict(model.named_modules())
    for name, spec in layers.items():
        if name not in modules:
            raise ValueError(f"{LOWRANK_FILE} names layer {name!r}, which the model does not have")
        dtype = next(modules[name].parameters()).dtype
        if spec["type"] == "linear":
            new: nn.Module = LowRankLinear(
                spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"], dtype=dtype
            )
        elif spec["type"] == "embedding":
            new = LowRankEmbedding(
                spec["num_embeddings"],
                spec["embedding_dim"],
                spec["rank"],
                padding_idx=spec["padding_idx"],
                dtype=dtype,
            )
        else:
            raise ValueError(f"{LOWRANK_FILE}: layer {name!r} has unknown type {spec['type']!r}")
        _set_submodule(model, name, new)


def save_student(model: nn.Module, path: str | Path, tokenizer: Any = None) -> Path:
    """Save a student folder. Without low-rank layers a Hugging Face model is saved with
    `save_pretrained` (a plain folder); otherwise `model.safetensors` + `config.json` (when the
    model has a HF config) + `kdkit_lowrank.json` describing the factorised layers (see the module
    docstring), reloaded with `load_student`. Tokenizer files are added when a tokenizer is given.
    """
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = lowrank_layers(model)
    config = getattr(model, "config", None)
    if not layers and hasattr(model, "save_pretrained"):
        model.save_pretrained(path)
    else:
        save_model(model, str(path / "model.safetensors"))
        if config is not None:
            config.architectures = [type(model).__name__]
            config.save_pretrained(path)
        layout = {
            "format": LOWRANK_FORMAT,
            "version": 1,
            "architecture": type(model).__name__,
            "layers": layers,
        }
        (path / LOWRANK_FILE).write_text(json.dumps(layout, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_student(path: str | Path, skeleton: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Reload a folder written by `save_student`.

    A plain HF folder (no kdkit_lowrank.json) loads through transformers' class named in its config.
    A factorised folder: the dense architecture is built from `config.json` (HF models) or from
    `skeleton` (a plain torch module of the dense architecture, or a function returning one), its
    listed layers are swapped for low-rank ones, and the safetensors weights are loaded strictly.
    Returns the model in eval mode.
    """
    import transformers
    from safetensors.torch import load_model

    path = Path(path)
    layout_file = path / LOWRANK_FILE
    layout: dict[str, Any] | None = None
    if layout_file.exists():
        layout = json.loads(layout_file.read_text())
        if layout.get("format") != LOWRANK_FORMAT or layout.get("version") != 1:
            raise ValueError(f"{layout_file}: not a {LOWRANK_FORMAT} v1 file")
    if skeleton is None:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: pass skeleton= (the dense architecture)")
        config = transformers.AutoConfig.from_pretrained(path)
        names = [layout["architecture"]] if layout else list(getattr(config, "architectures", None) or [])
        cls = getattr(transformers, names[0], None) if names else None
        if cls is None:
            raise ValueError(f"{path}: no transformers architecture named {names} (pass skeleton=)")
        if layout is None:
            return cls.from_pretrained(path).eval()
        model = cls._from_config(config)
    elif isinstance(skeleton, nn.Module):
        model = copy.deepcopy(skeleton)
    else:
        model = skeleton()
    if layout is None:
        raise FileNotFoundError(f"{path} has no {LOWRANK_FILE}")
    _apply_layout(model, layout["layers"])
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: weights do not match the layout (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


__all__ = [
    "BuildReport",
    "LOWRANK_FILE",
    "LowRankEmbedding",
    "LowRankLinear",
    "derive_student",
    "factorize",
    "forward_flops",
    "layer_stack",
    "load_student",
    "lowrank_layers",
    "merge_lowrank",
    "save_student",
    "select_layers",
    "select_module_layers",
    "student_config",
    "teacher_intermediate",
]
