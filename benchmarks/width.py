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
    args = parser.parse_args(argv)
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
