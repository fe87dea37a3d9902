"""What a DP-trained student's (ε, δ) covers and what it does not, as data (privacy.json) and Markdown."""

from __future__ import annotations

from typing import Any

SAMPLING_SCHEME = (
    "Poisson subsampling: each record joins each step's batch independently with probability q "
    "(batch sizes vary; empty batches still add noise)"
)


def privacy_statement(plan: dict[str, Any], epsilon: float, steps: int, *, secure_mode: bool,
                      teacher_note: str | None = None) -> dict[str, Any]:
    """What (ε, δ) covers and what it does not, with every parameter it rests on (privacy.json)."""
    return {
        "epsilon": epsilon,
        "delta": plan["delta"],
        "accountant": plan["accountant"],
        "steps_taken": steps,
        "parameters": plan,
        "sampling_scheme": SAMPLING_SCHEME,
        "covered": (
            "the student's training on the private records: every parameter update of the student is "
            "the output of the subsampled Gaussian mechanism over per-record clipped gradients, so the "
            "released student (and any text it generates later) is (ε, δ)-DP with respect to adding or "
            "removing one private record (one dataset row; repeated or related rows are separate records)"
        ),
        "not_covered": [
            "the teacher: it is used as given; if it was trained or fine-tuned non-privately on the same "
            "or related private data, its weights and outputs carry no guarantee, and neither does "
            "anything derived from them outside this training run",
            "hyper-parameter search: runs tried on the private data and discarded spend privacy too",
            "records duplicated across rows (a person with k rows is protected at group level k)",
            "the evaluation metrics in this report, computed on held-out data without noise",
        ],
        "randomness": (
            "secure_mode: Opacus' secure noise generation; the Poisson sampling still draws from a seeded "
            "PRNG (the guarantee assumes its seed secret)" if secure_mode else
            "seeded pseudo-random sampling and noise (reproducible; the guarantee assumes the seed is "
            "secret and the PRNG indistinguishable from true randomness)"
        ),
        **({"teacher": teacher_note} if teacher_note else {}),
    }


def privacy_markdown(statement: dict[str, Any]) -> str:
    """The report section for one private student, from its privacy.json."""
    p = statement["parameters"]
    eps = statement["epsilon"]
    lines = [
        "## Privacy",
        "",
        f"**(ε, δ) = ({eps:.3g}, {statement['delta']:.3g})** by the "
        f"{statement['accountant'].upper()} accountant "
        f"after {statement['steps_taken']} DP-SGD steps: sampling rate q = {p['sample_rate']:.4g} over "
        f"N = {p['records']} records, noise multiplier σ = {p['noise_multiplier']:.4g}, per-example "
        f"clipping norm C = {p['max_grad_norm']:.3g}.",
        "",
        f"- Covered: {statement['covered']}.",
        f"- Sampling assumed by the accountant: {statement['sampling_scheme']}.",
        f"- Randomness: {statement['randomness']}.",
        "- Not covered:",
        *[f"  - {item}" for item in statement["not_covered"]],
    ]
    if statement.get("teacher"):
        lines.append(f"- Teacher: {statement['teacher']}")
    return "\n".join(lines) + "\n"
