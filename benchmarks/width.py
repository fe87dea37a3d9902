"""Minimum-width predictor: validation on planted features, and the prediction for the MiniLM teacher.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/width.py                # planted + toy students
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/width.py --encoder DIR  # + a teacher folder

1. Planted: activations x = Σ s_i a_i D_i with F known features at sparsity α (kdkit.diagnostics.
   width.planted_activations); an SAE estimates F̂ and α̂; the predicted critical width F̂/g(α̂) is
   compared with the planted F/g(α), per configuration and seed.
2. Toy students: for one planted configuration, students of width w read the activation x and must
   output the F feature codes through a width-w bottleneck, ReLU(U·(V·x) + b) (the Elhage et al.
   toy model, here with the teacher's activation as input); their importance-weighted MSE is
   compared with the predicted floor at each width (ordering and affine fit R²).
3. Encoder (optional): the SAE prediction on a Hugging Face teacher's last layer over the Rotten
   Tomatoes texts.
Writes docs/benchmarks/width.json and docs/benchmarks/width_floor.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.diagnostics.width import (
    capacity_per_dim,
    critical_width,
    fit_affine,
    planted_activations,
    plot_floor,
    predict_from_stats,
    sae_stats,
    train_sae,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
DECAY = 0.3  # importance of planted feature i ∝ (i + 1)^−DECAY in the toy-student experiment
CONFIGS = [(32, 32, 0.95), (64, 32, 0.95), (48, 24, 0.97)]  # (F, teacher width, α)


def planted(seeds: list[int], steps: int) -> list[dict[str, Any]]:
    rows = []
    for features, width, alpha in CONFIGS:
        for seed in seeds:
            started = time.perf_counter()
            x, _ = planted_activations(features, width, alpha, 12_000, seed=seed)
            sae = train_sae(x, dictionary_size=8 * width, steps=steps, seed=seed)
            stats = sae_stats(sae, x)
            row = {
                "F": features,
                "width": width,
                "alpha": alpha,
                "seed": seed,
                "F_hat": stats.num_features,
                "alpha_hat": stats.alpha,
                "d_star": critical_width(features, alpha),
                "d_star_hat": critical_width(stats.num_features, min(stats.alpha, 1 - 1e-9)),
                "explained_variance": stats.explained_variance,
                "seconds": time.perf_counter() - started,
            }
            row["rel_error"] = (row["d_star_hat"] - row["d_star"]) / row["d_star"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def toy_students(widths: list[int], steps: int, seed: int = 0) -> tuple[dict[str, Any], Any]:
    """Students of each width on the first planted configuration with decaying importance."""
    features, width, alpha = 64, 32, 0.95
    x, _, codes = planted_activations(
        features, width, alpha, 12_000, importance_decay=DECAY, seed=seed, return_codes=True
    )
    importance = codes.square().mean(0)
    sae = train_sae(x, dictionary_size=8 * width, steps=steps, seed=seed)
    stats = sae_stats(sae, x)
    prediction = predict_from_stats(stats, widths, teacher_width=width)
    measured = {}
    for w in widths:
        torch.manual_seed(seed)
        student = nn.Sequential(nn.Linear(width, w, bias=False), nn.Linear(w, features), nn.ReLU())
        optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (512,), generator=gen)
            loss = (importance * (student(x[idx]) - codes[idx]).square()).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            final = (importance * (student(x) - codes).square()).sum(-1).mean()
            measured[w] = float(
                final / (importance * codes.square()).sum(-1).mean()
            )  # share of importance lost
    floors = [row["floor"] for row in prediction.rows]
    losses = [measured[w] for w in widths]
    order_agree = sum(
        (floors[i] - floors[j]) * (losses[i] - losses[j]) >= 0 for i in range(len(widths)) for j in range(i)
    ) / (len(widths) * (len(widths) - 1) / 2)
    result = {
        "F": features,
        "width": width,
        "alpha": alpha,
        "importance_decay": DECAY,
        "F_hat": stats.num_features,
        "alpha_hat": stats.alpha,
        "d_star": critical_width(features, alpha),
        "d_star_hat": prediction.critical_width,
        "widths": widths,
        "predicted_floor": floors,
        "measured_loss_share": losses,
        "pairwise_order_agreement": order_agree,
        "affine": fit_affine(floors, losses),
    }
    return result, (prediction, measured)


def encoder(folder: str, texts: int, steps: int) -> dict[str, Any]:
    from transformers import AutoModel, AutoTokenizer

    from kdkit.diagnostics.width import collect_activations, predict_width

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from students import _module

    rt = _module("kdkit.data.rotten_tomatoes")
    corpus, _ = rt.load_rotten_tomatoes("train")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batches = (
        dict(tokenizer(corpus[i : i + 32], truncation=True, max_length=32, padding=True, return_tensors="pt"))
        for i in range(0, texts, 32)
    )
    acts = collect_activations(model, batches, layer=-1, max_tokens=20_000)
    widths = [16, 32, 64, 96, 128, 192, 256, 384]
    prediction = predict_width(acts, widths, dictionary_size=4 * acts.shape[1], steps=steps)
    plot_floor(prediction, OUT / "width_minilm.png", title="fine-tuned MiniLM, last layer")
    return prediction.as_dict() | {"tokens": int(acts.shape[0]), "steps": steps}

# ----------------------------------------------------------------------------------------------
# Encoder validation: is F̂, α̂ stable on the MiniLM teacher, and do the predicted floors order the
# losses of students of several widths trained to carry the teacher layer's activations?

ENC_WIDTHS = [16, 32, 64, 128, 256, 384]


def teacher_activations(layer: int, split: str, tokens: int) -> torch.Tensor:
    """hidden_states[layer] of the shared fine-tuned MiniLM teacher at real tokens of a Rotten
    Tomatoes split (sequences cut at 40 tokens, as the teacher was trained): [N ≤ tokens, 384]."""
    from transformers import AutoModel, AutoTokenizer

    from kdkit.data.rotten_tomatoes import load_rotten_tomatoes
    from kdkit.diagnostics.width import collect_activations
    from kdkit.pipelines.text_teacher import MAX_LENGTH, rotten_tomatoes_teacher

    folder = rotten_tomatoes_teacher()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    texts, _ = load_rotten_tomatoes(split)
    batches = (
        dict(tokenizer(texts[i : i + 50], truncation=True, max_length=MAX_LENGTH, padding=True,
                       return_tensors="pt"))
        for i in range(0, len(texts), 50)
    )
    return collect_activations(model, batches, layer=layer, max_tokens=tokens)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (ties get their average rank)."""

    def ranks(values: list[float]) -> torch.Tensor:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return torch.tensor(out, dtype=torch.float64)

    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else float("nan")


def sae_grid(
    acts: torch.Tensor, dictionaries: list[int], token_counts: list[int], steps: int, l1s: list[float]
) -> list[dict[str, Any]]:
    """F̂, α̂, d* and the predicted floors for each SAE dictionary size × corpus size × l1."""
    rows = []
    for tokens in token_counts:
        for m in dictionaries:
            for l1 in l1s:
                started = time.perf_counter()
                x = acts[:tokens]
                sae = train_sae(x, dictionary_size=m, steps=steps, l1=l1, per_dimension=True, batch_size=256)
                stats = sae_stats(sae, x)
                prediction = predict_from_stats(stats, ENC_WIDTHS, teacher_width=int(x.shape[1]))
                row = {
                    "tokens": int(x.shape[0]), "dictionary": m, "l1": l1, "steps": steps,
                    "F_hat": stats.num_features, "alpha_hat": stats.alpha,
                    "d_star": prediction.critical_width,
                    "explained_variance": stats.explained_variance, "l0": stats.l0,
                    "dead": stats.dead,
                    "floors": {int(r["width"]): r["floor"] for r in prediction.rows},
                    "seconds": time.perf_counter() - started,
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def standardiser(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """train_sae's per-dimension standardisation (center, scale), so losses are in the SAE's units."""
    center = train.mean(0)
    scale = (train - center).std(0).clamp_min(1e-8)
    return center, scale * ((train - center) / scale).square().sum(-1).mean().sqrt()


def width_students(
    train: torch.Tensor, heldout: torch.Tensor, widths: list[int], steps: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Students of width w that must carry the teacher layer's activation through a width-w code:
    x̂ = W_o·ReLU(W_u·(W_d·x) + b_u) + b_o (readout 2·d wide, so features stored in superposition
    can be read back), MSE on the standardised activations, Adam 1e-3 with cosine decay, batch 256.
    Measured loss: held-out share of variance lost (‖x − x̂‖² / ‖x − mean‖², validation-split tokens).
    Also the best linear student of width w (PCA, Eckart–Young) for reference."""
    center, scale = standardiser(train)
    x_train, x_test = (train - center) / scale, (heldout - center) / scale
    d = x_train.shape[1]
    total = float((x_test - x_test.mean(0)).square().sum())
    covariance = x_train.T @ x_train / len(x_train)
    eigvecs = torch.linalg.eigh(covariance).eigenvectors.flip(1)
    rows = []
    for w in widths:
        started = time.perf_counter()
        torch.manual_seed(seed)
        student = nn.Sequential(
            nn.Linear(d, w, bias=False), nn.Linear(w, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)
        )
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = x_train[torch.randint(0, len(x_train), (256,), generator=gen)]
            loss = (student(batch) - batch).square().sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            lost = float((student(x_test) - x_test).square().sum()) / total
            basis = eigvecs[:, :w]
            centred = x_test - x_train.mean(0)
            pca_lost = float((centred - centred @ basis @ basis.T).square().sum()) / total
        row = {"width": w, "seed": seed, "steps": steps, "loss_share": lost, "pca_loss_share": pca_lost,
               "seconds": time.perf_counter() - started}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def encoder_validation(args: argparse.Namespace, command: str) -> None:
    """--encoder-validation: the SAE grid and/or the width students (--part), into width_encoder.json."""
    path = OUT / "width_encoder.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    torch.set_num_threads(1)
    train = teacher_activations(args.layer, "train", max(args.tokens))
    meta = {"layer": args.layer, "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread"}
    if "sae" in args.part:
        grid = sae_grid(train, args.dictionaries, args.tokens, args.sae_steps, args.l1)
        out = json.loads(path.read_text()) if path.exists() else {}
        out[args.sae_key] = {**meta, "rows": grid, "command": command}
        path.write_text(json.dumps(out, indent=1))
    if "students" in args.part:
        heldout = teacher_activations(args.layer, "validation", 8000)
        rows = []
        for seed in args.seeds:
            rows += width_students(train[: max(args.tokens)], heldout, ENC_WIDTHS, args.student_steps, seed)
        out = json.loads(path.read_text()) if path.exists() else {}
        kept = [r for r in out.get("students", {}).get("rows", []) if r["seed"] not in args.seeds]
        out["students"] = {**meta, "rows": kept + rows, "heldout_tokens": int(heldout.shape[0]),
                           "train_tokens": int(min(len(train), max(args.tokens))), "command": command}
        path.write_text(json.dumps(out, indent=1))



def render(out: dict[str, Any]) -> str:
    """The Markdown block written between the width markers of docs/benchmarks/students.md."""
    lines = [
        "Planted features (SAE estimate vs the planted truth; 12,000 activations, dictionary 8 × width, "
        f"{out.get('steps', '?')} SAE steps):",
        "",
        "| planted F | width | planted α | seed | F̂ | α̂ | planted d* | predicted d* | error |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["planted"]:
        lines.append(
            f"| {r['F']} | {r['width']} | {r['alpha']} | {r['seed']} | {r['F_hat']} | {r['alpha_hat']:.4f} "
            f"| {r['d_star']:.2f} | {r['d_star_hat']:.2f} | {100 * r['rel_error']:+.1f}% |"
        )
    toy = out.get("toy_students")
    if toy:
        lines += [
            "",
            f"Toy students (planted F = {toy['F']} in width {toy['width']}, α = {toy['alpha']}, importance "
            f"∝ (i+1)^−{toy['importance_decay']}; a width-w bottleneck student recovers the feature codes "
            f"from the teacher activation): SAE F̂ = {toy['F_hat']}, α̂ = {toy['alpha_hat']:.4f}, "
            f"predicted d* = {toy['d_star_hat']:.2f} (planted {toy['d_star']:.2f}).",
            "",
            "| width | predicted floor | measured share of importance lost |",
            "|---:|---:|---:|",
        ]
        for w, f, m in zip(toy["widths"], toy["predicted_floor"], toy["measured_loss_share"]):
            lines.append(f"| {w} | {f:.4f} | {m:.4f} |")
        fit = toy["affine"]
        lines += [
            "",
            f"Pairwise ordering agreement of predicted floors and measured losses: "
            f"{100 * toy['pairwise_order_agreement']:.0f}%; affine fit loss ≈ {fit['baseline']:.4f} + "
            f"{fit['scale']:.3f} × floor, R² = {fit['r2']:.3f}.",
            "",
            "![predicted floor vs width](width_floor.png)",
        ]
    enc = out.get("encoder")
    if enc:
        lines += [
            "",
            f"Fine-tuned MiniLM teacher, last layer, {enc['tokens']} Rotten Tomatoes tokens: F = "
            f"{enc['num_features']}, α = {enc['alpha']:.4f}, g(α) = {enc['capacity_per_dim']:.2f}, "
            f"d* = {enc['critical_width']:.0f} (teacher width {enc['teacher_width']}); SAE explained "
            f"variance {enc['sae']['explained_variance']:.3f}; {enc['steps']} SAE steps, dictionary "
            f"{enc['sae']['dictionary_size']}. Command: `{out.get('encoder_command', out['command'])}`.",
        ]
    lines += ["", f"Command: `{out['command']}` ({out['machine']})."]
    return "\n".join(lines)


def _floor(sae_row: dict[str, Any], width: int) -> float:
    floors = sae_row["floors"]  # int keys in memory, str keys after a JSON round trip
    return float(floors[str(width)] if str(width) in floors else floors[width])


def render_encoder(enc: dict[str, Any]) -> tuple[str, Any, dict[float, float]]:
    """The Markdown block for the encoder validation, the reference prediction and measured losses."""
    from kdkit.diagnostics.width import WidthPrediction

    lines: list[str] = []
    sae_keys = sorted(k for k in enc if k.startswith("sae"))
    sae_rows = [row for k in sae_keys for row in enc[k]["rows"]]
    student_rows = enc.get("students", {}).get("rows", [])
    layer = enc.get("students", enc.get(sae_keys[0], {}) if sae_keys else {}).get("layer")
    if sae_rows:
        lines += [
            f"SAE estimates on the fine-tuned MiniLM teacher, hidden_states[{layer}] (tokens of the "
            "Rotten Tomatoes train split, each dimension standardised), dictionary sizes × corpus sizes:",
            "",
            "| tokens | dictionary | l1 | SAE steps | explained var. | L0 | F̂ | α̂ | d* = F̂/g(α̂) "
            "| floor at 32 / 128 | Spearman vs measured | mean abs(floor − measured) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        student_widths = sorted({r["width"] for r in student_rows})
        mean_loss = [
            statistics.mean(r["loss_share"] for r in student_rows if r["width"] == w) for w in student_widths
        ]
        for r in sae_rows:
            floors = [_floor(r, w) for w in student_widths]
            rho = spearman(floors, mean_loss) if student_rows else float("nan")
            gaps = [abs(f - m) for f, m in zip(floors, mean_loss)]
            gap = statistics.mean(gaps) if gaps else float("nan")
            lines.append(
                f"| {r['tokens']} | {r['dictionary']} | {r['l1']} | {r['steps']} "
                f"| {r['explained_variance']:.3f} | {r['l0']:.1f} | {r['F_hat']} | {r['alpha_hat']:.4f} "
                f"| {r['d_star']:.1f} | {_floor(r, 32):.3f} / {_floor(r, 128):.3f} | {rho:.2f} | {gap:.3f} |"
            )
        spread = []
        for l1 in sorted({r["l1"] for r in sae_rows}, reverse=True):
            group = [r for r in sae_rows if r["l1"] == l1]
            spread.append(
                f"l1 = {l1}: d* {min(r['d_star'] for r in group):.1f}–{max(r['d_star'] for r in group):.1f}, "
                f"F̂ {min(r['F_hat'] for r in group)}–{max(r['F_hat'] for r in group)}, α̂ "
                f"{min(r['alpha_hat'] for r in group):.4f}–{max(r['alpha_hat'] for r in group):.4f} "
                f"({len(group)} fit{'s' if len(group) > 1 else ''})"
            )
        commands = "; ".join(f"`{enc[k]['command']}`" for k in sae_keys)
        lines += ["", f"Spread: {'; '.join(spread)}. Commands: {commands} ({enc[sae_keys[0]]['machine']})."]
    measured: dict[float, float] = {}
    reference = None
    if student_rows:
        widths = sorted({r["width"] for r in student_rows})
        by_width = {w: [r for r in student_rows if r["width"] == w] for w in widths}
        measured = {float(w): statistics.mean(r["loss_share"] for r in rs) for w, rs in by_width.items()}
        pca = {float(w): statistics.mean(r["pca_loss_share"] for r in rs) for w, rs in by_width.items()}
        # the reference fit: the default l1, the largest corpus and dictionary
        ref = max(sae_rows, key=lambda r: (r["l1"] == 0.3, r["tokens"], r["dictionary"]), default=None)
        header = "| width d_S | measured: share of variance lost | best linear student (PCA) |"
        if ref:
            header += f" predicted floor (F̂ = {ref['F_hat']}, α̂ = {ref['alpha_hat']:.3f}) |"
        lines += ["", f"Students of width d_S carrying hidden_states[{layer}] through a width-d_S code "
                  f"({enc['students']['train_tokens']} training tokens, {enc['students']['heldout_tokens']} "
                  f"held-out validation-split tokens, {student_rows[0]['steps']} steps, seeds "
                  f"{sorted({r['seed'] for r in student_rows})}):", "", header,
                  "|---:|---:|---:|" + ("---:|" if ref else "")]
        for w in widths:
            row = f"| {w} | {measured[float(w)]:.4f} | {pca[float(w)]:.4f} |"
            if ref:
                row += f" {_floor(ref, w):.4f} |"
            lines.append(row)
        if sae_rows:
            rhos = []
            for r in sae_rows:
                floors = [_floor(r, w) for w in widths]
                rhos.append(spearman(floors, [measured[float(w)] for w in widths]))
            lines += ["", f"Spearman rank correlation of predicted floors and measured losses over the "
                      f"{len(widths)} widths: {min(rhos):.2f}–{max(rhos):.2f} across the SAE grid "
                      f"(reference fit: {rhos[sae_rows.index(ref)]:.2f})."]
            reference = WidthPrediction(
                num_features=ref["F_hat"], alpha=ref["alpha_hat"],
                capacity_per_dim=capacity_per_dim(ref["alpha_hat"]), critical_width=ref["d_star"],
                teacher_width=384, rows=[{"width": float(w), "floor": _floor(ref, w)} for w in widths],
            )
            lines += ["", "![predicted floor vs width, MiniLM](width_minilm.png)"]
        lines += ["", f"Command: `{enc['students']['command']}` ({enc['students']['machine']})."]
    return "\n".join(lines), reference, measured


def plot_encoder(enc: dict[str, Any], measured: dict[float, float]) -> None:
    """Predicted floor vs width for each SAE l1 (its largest fit), with the measured students and the
    best linear (PCA) student, into width_minilm.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for k in enc if k.startswith("sae") for row in enc[k]["rows"]]
    student_rows = enc["students"]["rows"]
    widths = sorted(measured)
    pca = [statistics.mean(r["pca_loss_share"] for r in student_rows if r["width"] == w) for w in widths]
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    for l1 in sorted({r["l1"] for r in rows}, reverse=True):
        best = max((r for r in rows if r["l1"] == l1), key=lambda r: (r["tokens"], r["dictionary"]))
        label = f"predicted, SAE l1 {l1} (d* {best['d_star']:.0f}, EV {best['explained_variance']:.2f})"
        ax.plot(widths, [_floor(best, int(w)) for w in widths], "o-", label=label)
    ax.plot(widths, [measured[w] for w in widths], "s-", color="black", lw=2, label="measured students")
    ax.plot(widths, pca, "x:", color="grey", label="best linear student (PCA)")
    ax.set_xscale("log")
    ax.set_xticks(widths, [f"{w:.0f}" for w in widths])
    ax.minorticks_off()
    ax.set_xlabel("student width d_S")
    ax.set_ylabel("share of the layer lost")
    ax.set_title(f"MiniLM hidden_states[{enc['students']['layer']}]: predicted floors vs students")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "width_minilm.png")
    plt.close(fig)


def write_encoder_doc() -> None:
    enc = json.loads((OUT / "width_encoder.json").read_text())
    text, reference, measured = render_encoder(enc)
    if reference is not None:
        plot_encoder(enc, measured)
    doc_path = OUT / "students.md"
    doc = doc_path.read_text()
    start, end = "<!-- width-encoder:start -->", "<!-- width-encoder:end -->"
    if start not in doc:
        doc += f"\n{start}\n{end}\n"
    head, _, rest = doc.partition(start)
    _, _, tail = rest.partition(end)
    doc_path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def write_doc(text: str) -> None:
    doc_path = OUT / "students.md"
    doc = doc_path.read_text()
    start, end = "<!-- width:start -->", "<!-- width:end -->"
    head, _, rest = doc.partition(start)
    _, _, tail = rest.partition(end)
    doc_path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--encoder", default=None, help="a Hugging Face teacher folder (optional)")
    parser.add_argument("--encoder-texts", type=int, default=1000)
    parser.add_argument("--encoder-steps", type=int, default=600)
    parser.add_argument("--report-only", action="store_true", help="rewrite the doc from width.json")
    parser.add_argument("--toy-only", action="store_true", help="redo the toy students in width.json")
    parser.add_argument(
        "--encoder-only", action="store_true", help="add the encoder to an existing width.json"
    )
    parser.add_argument("--encoder-validation", action="store_true",
                        help="SAE stability grid and width students on the MiniLM teacher")
    parser.add_argument("--part", nargs="+", default=["sae", "students"], choices=["sae", "students"])
    parser.add_argument("--layer", type=int, default=3, help="hidden_states index (0 = embeddings)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8000, 16000])
    parser.add_argument("--dictionaries", type=int, nargs="+", default=[768, 1536])
    parser.add_argument("--l1", type=float, nargs="+", default=[0.3])
    parser.add_argument("--sae-steps", type=int, default=1500)
    parser.add_argument("--sae-key", default="sae", help="key of width_encoder.json for this SAE grid")
    parser.add_argument("--student-steps", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.encoder_validation and args.report_only:
        write_encoder_doc()
        return
    if args.encoder_validation:
        command = "benchmarks/width.py " + " ".join(argv if argv is not None else sys.argv[1:])
        encoder_validation(args, command)
        write_encoder_doc()
        return
    if args.toy_only:
        out = json.loads((OUT / "width.json").read_text())
        toy, (prediction, measured) = toy_students([2, 4, 6, 8, 12, 16, 24, 32], args.steps)
        out["toy_students"] = toy
        out["toy_command"] = "benchmarks/width.py " + " ".join(argv if argv is not None else sys.argv[1:])
        print(json.dumps(toy), flush=True)
        plot_floor(
            prediction,
            OUT / "width_floor.png",
            measured=measured,
            title=f"planted F=64, α=0.95, width 32: d* = {toy['d_star']:.1f}, "
            f"predicted {toy['d_star_hat']:.1f}",
        )
        (OUT / "width.json").write_text(json.dumps(out, indent=1))
        write_doc(render(out))
        return
    parser_only = args.report_only or args.encoder_only
    if parser_only:
        out = json.loads((OUT / "width.json").read_text())
        if args.encoder_only:
            if not args.encoder:
                raise SystemExit("--encoder-only needs --encoder DIR")
            out["encoder"] = encoder(args.encoder, args.encoder_texts, args.encoder_steps)
            out["encoder_command"] = "benchmarks/width.py " + " ".join(
                argv if argv is not None else sys.argv[1:]
            )
            (OUT / "width.json").write_text(json.dumps(out, indent=1))
        write_doc(render(out))
        return
    torch.set_num_threads(1)
    out: dict[str, Any] = {
        "command": "benchmarks/width.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "steps": args.steps,
        "g_check": {
            "alpha": 0.992,
            "g": capacity_per_dim(0.992),
            "d_star_pythia": critical_width(28_700, 0.992),
        },
    }
    out["planted"] = planted(args.seeds, args.steps)
    toy, (prediction, measured) = toy_students([2, 4, 6, 8, 12, 16, 24, 32], args.steps)
    out["toy_students"] = toy
    print(json.dumps(toy), flush=True)
    plot_floor(
        prediction,
        OUT / "width_floor.png",
        measured=measured,
        title=f"planted F=64, α=0.95, width 32: d* = {toy['d_star']:.1f}, predicted {toy['d_star_hat']:.1f}",
    )
    if args.encoder:
        out["encoder"] = encoder(args.encoder, args.encoder_texts, args.encoder_steps)
        print(json.dumps({k: v for k, v in out["encoder"].items() if k != "sae"}), flush=True)
    (OUT / "width.json").write_text(json.dumps(out, indent=1))
    write_doc(render(out))


if __name__ == "__main__":
    main()
