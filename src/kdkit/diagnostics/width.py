"""How narrow can a student be? The minimum-width predictor (Sarkar & Deka 2026, "Geometric limits of
knowledge distillation").

Theory: a layer of width d represents features in superposition; with feature sparsity α (the
probability that a feature is off on an input) it can hold at most d·g(α) features,

    g(α) = 1 / ((1 − α) · ln(1 / (1 − α))).

A teacher layer with F live features therefore needs a student of width at least the critical width
d* = F / g(α). A narrower student keeps its ⌊d·g(α)⌋ most important features and loses the rest:
its predicted loss floor is the share of total importance carried by the lost features (0 at and
above d*). Measured distillation losses follow an affine map of that floor (a width-independent
architectural baseline plus a geometric term), which `fit_affine` calibrates.

Measurement: train a sparse autoencoder (SAE) on the teacher layer's activations; F = live SAE
features (firing on at least `min_frequency` of inputs, near-duplicate dictionary directions merged),
α = 1 − their mean firing frequency, importance of a feature = its mean squared contribution to the
reconstruction, E[f_i²]·‖d_i‖². The formula is meant for sparse features; below α = 1 − 1/e
(≈ 0.632) g(α) grows again and the prediction is flagged as outside that regime.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SPARSE_REGIME = 1.0 - 1.0 / math.e
# An SAE that misses more of the layer than this undercounts its features (see predict_width).
MIN_EXPLAINED_VARIANCE = 0.9
AUTO_L1 = (0.3, 0.1, 0.03, 0.01)


def capacity_per_dim(alpha: float) -> float:
    """g(α) = 1 / ((1 − α)·ln(1/(1 − α))): features one dimension can hold at sparsity α ∈ (0, 1)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"sparsity alpha must be in (0, 1), got {alpha}")
    density = 1.0 - alpha
    return 1.0 / (density * math.log(1.0 / density))


def critical_width(num_features: float, alpha: float) -> float:
    """d* = F / g(α): the narrowest width that holds all F features (a real number; round up)."""
    if num_features < 0:
        raise ValueError(f"num_features must be non-negative, got {num_features}")
    return num_features / capacity_per_dim(alpha)


def predicted_floor(importances: Sequence[float] | Tensor, alpha: float, width: float) -> float:
    """Share of total importance lost by a width-`width` student: the features past its capacity
    ⌊width·g(α)⌋, the least important ones first. importances: one non-negative value per feature."""
    imp = torch.as_tensor(importances, dtype=torch.float64).flatten().sort(descending=True).values
    total = float(imp.sum())
    if total <= 0:
        return 0.0
    kept = min(len(imp), math.floor(width * capacity_per_dim(alpha)))
    return float(imp[kept:].sum()) / total


def fit_affine(floors: Sequence[float], losses: Sequence[float]) -> dict[str, float]:
    """Least-squares loss ≈ baseline + scale·floor. Returns baseline, scale and R² (1 − SS_res/SS_tot)."""
    x = torch.as_tensor(floors, dtype=torch.float64)
    y = torch.as_tensor(losses, dtype=torch.float64)
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError("fit_affine needs at least two (floor, loss) pairs of equal length")
    design = torch.stack([torch.ones_like(x), x], dim=1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution.flatten()
    residual = y - design @ coef
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / total) if float(total) > 0 else 1.0
    return {"baseline": float(coef[0]), "scale": float(coef[1]), "r2": r2}


# ----------------------------------------------------------------------------------------------
# Sparse autoencoder


class SparseAutoencoder(nn.Module):
    """f = ReLU(W_e·(x − b_d) + b_e) [.., m];  x̂ = W_d·f + b_d [.., d]; decoder columns unit-norm.

    d: input width, m: dictionary size. The decoder is renormalised after each step so the L1
    penalty on f cannot be dodged by shrinking f and growing W_d.
    """

    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        decoder = torch.randn(d, m)
        decoder /= decoder.norm(dim=0, keepdim=True)
        self.decoder = nn.Parameter(decoder)  # [d, m]
        self.encoder = nn.Parameter(decoder.T.clone())  # [m, d], tied initialisation
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu((x - self.b_dec) @ self.encoder.T + self.b_enc)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.decoder.T + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def normalise(self) -> None:
        self.decoder /= self.decoder.norm(dim=0, keepdim=True).clamp_min(1e-8)


@dataclass
class SAEStats:
    """Feature statistics of a trained SAE over a set of activations.

    num_features: live features (firing on ≥ min_frequency of inputs, near-duplicates merged);
    alpha: 1 − mean firing frequency of the live features; importances: per live feature,
    E[f_i²] (decoder columns are unit-norm), descending; frequencies: their firing frequencies;
    explained_variance: 1 − ‖x − x̂‖² / ‖x − mean x‖²; l0: mean active features per input;
    dead: dictionary entries that never (or too rarely) fire.
    """

    num_features: int
    alpha: float
    importances: list[float]
    frequencies: list[float]
    explained_variance: float
    l0: float
    dead: int
    dictionary_size: int


def train_sae(
    activations: Tensor,
    *,
    dictionary_size: int | None = None,
    l1: float = 0.3,
    steps: int = 3000,
    batch_size: int = 512,
    lr: float = 3e-3,
    seed: int = 0,
    per_dimension: bool = False,
) -> SparseAutoencoder:
    """Fit a `SparseAutoencoder` to activations [N, d] (standardised inside: mean removed, scaled to
    unit mean squared norm per input, so `l1` means the same at every layer and model).

    per_dimension: first scale every dimension to unit variance. Transformer residual streams (BERT,
    MiniLM) have a few outlier dimensions with variance 10-100× the rest; without this they carry most
    of the squared norm, the SAE spends its features on them and F comes out far too small.

    Loss: mean ‖x − x̂‖² + l1 · mean Σ_i f_i (decoder columns unit-norm). dictionary_size defaults
    to 8·d. Returns the SAE (in eval mode) with `scale` and `center` buffers holding the standardisation.
    """
    if activations.dim() != 2 or activations.shape[0] < 2:
        raise ValueError(f"train_sae wants activations [N, d] with N ≥ 2, got {tuple(activations.shape)}")
    x_all = activations.detach().float()
    center = x_all.mean(0)
    scale = (x_all - center).std(0).clamp_min(1e-8) if per_dimension else torch.ones(())
    scale = scale * ((x_all - center) / scale).square().sum(-1).mean().sqrt().clamp_min(1e-8)
    x_all = (x_all - center) / scale
    n, d = x_all.shape
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d, dictionary_size or 8 * d)
    sae.register_buffer("center", center)
    sae.register_buffer("scale", scale)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, 2.0 * (1 - step / steps)))
    for _ in range(steps):
        x = x_all[torch.randint(0, n, (min(batch_size, n),), generator=generator)]
        x_hat, f = sae(x)
        loss = (x - x_hat).square().sum(-1).mean() + l1 * f.sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        sae.normalise()
    return sae.eval()


@torch.no_grad()
def sae_stats(
    sae: SparseAutoencoder,
    activations: Tensor,
    *,
    min_frequency: float = 1e-3,
    threshold: float = 0.4,
    merge_cosine: float = 0.8,
    co_firing: float = 0.5,
    coverage: float = 0.99,
) -> SAEStats:
    """Count live features and measure their sparsity and importance on activations [N, d].

    A feature "fires" on an input when its code exceeds `threshold` × that feature's mean nonzero
    code (so tiny leak-through activations are not counted as firing). Features firing on fewer
    than `min_frequency` of inputs are dead. Live features whose decoder directions have cosine
    ≥ `merge_cosine` and which fire together (≥ `co_firing` of the rarer one's inputs) are one
    feature split in two: merged (importances summed, firing = either fires). Of the rest, the
    most important features that together carry `coverage` of the total importance are counted
    (an SAE with spare dictionary entries fits the residual noise with many rare, weak codes;
    they carry the last percent of the importance and would inflate F several-fold).
    """
    x = (activations.detach().float() - sae.center) / sae.scale
    codes = []
    x_hat_err = torch.zeros((), dtype=torch.float64)
    for chunk in x.split(4096):
        x_hat, f = sae(chunk)
        codes.append(f)
        x_hat_err += (chunk - x_hat).double().square().sum()
    f = torch.cat(codes)  # [N, m]
    variance = (x - x.mean(0)).double().square().sum()
    explained = 1.0 - float(x_hat_err / variance.clamp_min(1e-30))
    nonzero = (f > 0).float()
    mean_nonzero = (f.sum(0) / nonzero.sum(0).clamp_min(1.0)).clamp_min(1e-12)
    fires = f > threshold * mean_nonzero
    freq = fires.float().mean(0)  # [m]
    importance = f.double().square().mean(0)  # decoder columns are unit-norm
    live = (freq >= min_frequency).nonzero().flatten().tolist()
    # merge split features: near-parallel decoder directions that fire on the same inputs
    live.sort(key=lambda i: -float(importance[i]))
    groups: list[list[int]] = []
    heads: list[Tensor] = []
    for i in live:
        direction = sae.decoder[:, i]
        match = None
        for k, head in enumerate(heads):
            if float(direction @ head) >= merge_cosine:
                j = groups[k][0]
                both = float((fires[:, i] & fires[:, j]).float().sum())
                fewer = float(min(fires[:, i].sum(), fires[:, j].sum()))
                if fewer > 0 and both / fewer >= co_firing:
                    match = k
                    break
        if match is None:
            groups.append([i])
            heads.append(direction)
        else:
            groups[match].append(i)
    merged_freq = [float(fires[:, g].any(dim=1).float().mean()) for g in groups]
    merged_imp = [float(importance[g].sum()) for g in groups]
    order = sorted(range(len(merged_imp)), key=lambda k: -merged_imp[k])
    total = sum(merged_imp)
    running, num = 0.0, 0
    for k in order:
        if total > 0 and running >= coverage * total:
            break
        running += merged_imp[k]
        num += 1
    order = order[:num]
    alpha = 1.0 - (sum(merged_freq[k] for k in order) / num if num else 0.0)
    return SAEStats(
        num_features=num,
        alpha=alpha,
        importances=[merged_imp[k] for k in order],
        frequencies=[merged_freq[k] for k in order],
        explained_variance=explained,
        l0=float(fires.float().sum(-1).mean()),
        dead=int(f.shape[1] - len(live)),
        dictionary_size=int(f.shape[1]),
    )


# ----------------------------------------------------------------------------------------------
# The prediction


@dataclass
class WidthPrediction:
    """F, α, g(α), d* and, per candidate width, the capacity, kept features and predicted floor."""

    num_features: int
    alpha: float
    capacity_per_dim: float
    critical_width: float
    teacher_width: int
    rows: list[dict[str, float]] = field(default_factory=list)
    sae: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A Markdown table of the candidate widths."""
        lines = [
            "| width | capacity d·g(α) | features kept | predicted floor (share of importance lost) |",
            "|---:|---:|---:|---:|",
        ]
        for row in self.rows:
            lines.append(
                f"| {row['width']:.0f} | {row['capacity']:.0f} | {row['kept']:.0f} / {self.num_features} "
                f"| {row['floor']:.4f} |"
            )
        return "\n".join(lines)


def predict_from_stats(stats: SAEStats, widths: Iterable[float], teacher_width: int) -> WidthPrediction:
    """Apply the theorem to measured SAE statistics for each candidate width."""
    if stats.num_features == 0:
        raise ValueError("the SAE found no live features: lower l1 or min_frequency, or train longer")
    alpha = min(max(stats.alpha, 1e-9), 1 - 1e-12)
    g = capacity_per_dim(alpha)
    prediction = WidthPrediction(
        num_features=stats.num_features,
        alpha=stats.alpha,
        capacity_per_dim=g,
        critical_width=critical_width(stats.num_features, alpha),
        teacher_width=teacher_width,
        sae=asdict(stats) | {"importances": None, "frequencies": None},
    )
    if stats.explained_variance < MIN_EXPLAINED_VARIANCE:
        prediction.warnings.append(
            f"the SAE explains only {stats.explained_variance:.0%} of the activations' variance: the "
            "features it misses are not counted, so F and the floors are too low (lower l1, or l1='auto')"
        )
    if alpha < SPARSE_REGIME:
        prediction.warnings.append(
            f"measured sparsity α = {alpha:.3f} is below 1 − 1/e ≈ 0.632, outside the formula's sparse "
            "regime: the prediction is optimistic; raise the SAE's l1 or use a wider dictionary"
        )
    for width in sorted(set(widths)):
        capacity = width * g
        prediction.rows.append(
            {
                "width": float(width),
                "capacity": capacity,
                "kept": float(min(stats.num_features, math.floor(capacity))),
                "floor": predicted_floor(stats.importances, alpha, width),
            }
        )
    return prediction


def predict_width(
    activations: Tensor,
    widths: Iterable[float],
    *,
    dictionary_size: int | None = None,
    l1: float | str = "auto",
    steps: int = 3000,
    seed: int = 0,
    min_frequency: float = 1e-3,
    per_dimension: bool = False,
) -> WidthPrediction:
    """Train an SAE on activations [N, d], measure F, α and importances, predict floors for `widths`
    (per_dimension: see `train_sae`; use it for transformer residual streams).

    l1: the SAE's sparsity penalty, or "auto": the largest of `AUTO_L1` whose SAE explains at least
    `MIN_EXPLAINED_VARIANCE` of the variance (the smallest one if none does; every fit is recorded
    in `prediction.sae["l1_sweep"]`). The penalty sets the measured sparsity α and so d*: on
    MiniLM, l1 = 0.3 explained 53-61% of a layer and predicted floors of 0 where trained students
    lost 20-46% of it; the fits near 90% explained variance matched them best
    (docs/benchmarks/students.md).
    """
    candidates = AUTO_L1 if l1 == "auto" else (float(l1),)
    sweep: list[dict[str, float]] = []
    for value in candidates:
        sae = train_sae(
            activations, dictionary_size=dictionary_size, l1=value, steps=steps, seed=seed,
            per_dimension=per_dimension,
        )
        stats = sae_stats(sae, activations, min_frequency=min_frequency)
        sweep.append({"l1": value, "explained_variance": stats.explained_variance,
                      "num_features": stats.num_features, "alpha": stats.alpha})
        if stats.explained_variance >= MIN_EXPLAINED_VARIANCE:
            break
    prediction = predict_from_stats(stats, widths, teacher_width=int(activations.shape[1]))
    prediction.sae["l1"] = sweep[-1]["l1"]
    prediction.sae["l1_sweep"] = sweep
    return prediction


# ----------------------------------------------------------------------------------------------
# Teacher activations and the plot


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    layer: int = -1,
    max_tokens: int = 50_000,
) -> Tensor:
    """Hidden states of one layer of a Hugging Face model at real (unpadded) tokens: [N, d].

    layer: an index into `output_hidden_states` (0 = embeddings, −1 = last layer).
    batches: model inputs with an attention_mask; stops after `max_tokens` tokens.
    """
    model.eval()
    rows: list[Tensor] = []
    count = 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer]  # [B, T, d]
        mask = inputs.get("attention_mask")
        flat = hidden[mask.bool()] if mask is not None else hidden.reshape(-1, hidden.shape[-1])
        rows.append(flat.float().cpu())
        count += flat.shape[0]
        if count >= max_tokens:
            break
    if not rows:
        raise ValueError("collect_activations got no batches")
    return torch.cat(rows)[:max_tokens]


def plot_floor(
    prediction: WidthPrediction,
    path: str | Path,
    *,
    measured: Mapping[float, float] | None = None,
    title: str | None = None,
) -> Path:
    """Predicted floor vs width (log x), the critical width as a vertical line, and optionally
    measured student losses {width: loss} on a second axis. Writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [row["width"] for row in prediction.rows]
    floors = [row["floor"] for row in prediction.rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    ax.plot(widths, floors, "o-", color="tab:blue", label="predicted floor")
    ax.axvline(
        prediction.critical_width, color="tab:red", ls="--", label=f"d* ≈ {prediction.critical_width:.0f}"
    )
    ax.set_xscale("log")
    ax.set_xlabel("student width d_S")
    ax.set_ylabel("share of feature importance lost")
    ax.set_title(title or f"F = {prediction.num_features}, α = {prediction.alpha:.3f}")
    if measured:
        twin = ax.twinx()
        xs = sorted(measured)
        twin.plot(xs, [measured[x] for x in xs], "s:", color="tab:green", label="measured loss")
        twin.set_ylabel("measured loss", color="tab:green")
        twin.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Planted features (validation)


def planted_activations(
    num_features: int,
    width: int,
    alpha: float,
    num_samples: int,
    *,
    importance_decay: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
    return_codes: bool = False,
) -> tuple[Tensor, ...]:
    """Synthetic activations with known features: x = Σ_i s_i·a_i·w_i·D_i (+ noise).

    D: [F, width] random unit directions; s_i ~ Bernoulli(1 − α) (feature i is on); a_i ~ U(0.5, 1.5);
    w_i = (i + 1)^(−importance_decay) (importance falls with i). Returns (x [N, width], D), plus the
    codes s·a·w [N, F] when `return_codes`.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_features, width, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    on = torch.rand(num_samples, num_features, generator=g) < (1 - alpha)
    amplitude = 0.5 + torch.rand(num_samples, num_features, generator=g)
    weight = (torch.arange(num_features, dtype=torch.float32) + 1) ** (-importance_decay)
    codes = on.float() * amplitude * weight
    x = codes @ directions
    if noise:
        x = x + noise * torch.randn(x.shape, generator=g)
    return (x, directions, codes) if return_codes else (x, directions)


__all__ = [
    "SAEStats",
    "SparseAutoencoder",
    "WidthPrediction",
    "capacity_per_dim",
    "collect_activations",
    "critical_width",
    "fit_affine",
    "planted_activations",
    "plot_floor",
    "predict_from_stats",
    "predict_width",
    "predicted_floor",
    "sae_stats",
    "train_sae",
]
