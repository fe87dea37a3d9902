"""write_report on synthetic results: every file is written, self-contained and consistent."""

import base64
import json
import math
import re
from pathlib import Path

import pytest
import torch

from kdkit.eval import classifier_metrics
from kdkit.report import load_history, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_history(path: Path, steps: int, scale: float) -> Path:
    lines = []
    for step in range(0, steps, 10):
        lines.append(
            json.dumps(
                {
                    "step": step,
                    "kd": scale * math.exp(-step / 40),
                    "ce": 2.0 / (1 + step / 50),
                    "lr": 1e-3,
                    "elapsed_s": step * 0.1,
                    "examples_per_s": 500.0,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def classifier_report(tmp_path_factory):
    # Built once for the module: rendering the three figures is the slow part (~3 s on a shared CPU).
    tmp_path = tmp_path_factory.mktemp("classifier_report")
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (300,))
    teacher = torch.randn(300, 5) + 3 * torch.nn.functional.one_hot(labels, 5)
    student = teacher + torch.randn(300, 5)
    t_metrics = classifier_metrics(teacher, labels)
    s_metrics = classifier_metrics(student, labels, teacher)
    rows = [
        {
            "model": "teacher",
            "accuracy": t_metrics["accuracy"],
            "ece": t_metrics["ece"],
            "parameters": 1_234_567,
            "size_on_disk_bytes": 4_940_000,
            "latency_ms_median": 3.21,
        },
        {
            "model": "student-kd",
            "accuracy": s_metrics["accuracy"],
            "ece": s_metrics["ece"],
            "agreement": s_metrics["agreement"],
            "kl_to_teacher": s_metrics["kl_to_teacher"],
            "parameters": 45_000,
            "size_on_disk_bytes": 181_000,
            "latency_ms_median": 0.42,
        },
    ]
    histories = {
        "student-kd": fake_history(tmp_path / "kd.jsonl", 300, 5.0),
        "student-ce": fake_history(tmp_path / "ce.jsonl", 200, 0.01),
    }
    reliability = {"teacher": t_metrics["reliability"], "student-kd": s_metrics["reliability"]}
    config = {"method": "kd", "train": {"steps": 300, "lr": 1e-3}, "data": Path("/data/fmnist")}
    run_dir = tmp_path / "run"
    written = write_report(
        run_dir,
        title="Fashion-MNIST: KD vs CE",
        rows=rows,
        histories=histories,
        reliability=reliability,
        config=config,
        notes=["seed 0", "CPU only"],
        extra={"epsilon": None, "seconds": 12.5},
    )
    return run_dir, written, rows


def test_all_files_are_written(classifier_report):
    run_dir, written, _ = classifier_report
    assert set(written) == {"metrics", "markdown", "html", "curves", "scatter", "reliability"}
    for key in ("curves", "scatter", "reliability"):
        assert written[key].parent == run_dir / "plots"
        assert written[key].read_bytes().startswith(PNG_MAGIC)
        assert written[key].stat().st_size > 5000  # a real figure, not an empty canvas


def test_metrics_json_round_trips(classifier_report):
    run_dir, written, rows = classifier_report
    data = json.loads(written["metrics"].read_text())
    assert data["rows"] == rows
    assert data["title"] == "Fashion-MNIST: KD vs CE"
    assert data["config"]["data"] == "/data/fmnist"
    assert data["extra"] == {"epsilon": None, "seconds": 12.5}
    assert data["reliability"]["teacher"]["count"][-1] > 0
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["kdkit"] and data["environment"]["transformers"]
    assert data["created"].endswith("+00:00")
    assert set(data["plots"]) == {"curves", "scatter", "reliability"}


def test_markdown_has_the_table_plots_notes_and_config(classifier_report):
    _, written, rows = classifier_report
    md = written["markdown"].read_text()
    assert md.startswith("# Fashion-MNIST: KD vs CE")
    assert "| Model | Accuracy | ECE | Parameters | Size on disk | Latency (median) |" in md
    assert f"{100 * rows[0]['accuracy']:.2f}%" in md
    assert "1,234,567" in md and "4.94 MB" in md and "3.21 ms" in md
    student_line = next(line for line in md.splitlines() if line.startswith("| student-kd"))
    assert "45,000" in student_line
    assert "![Reliability diagrams](plots/reliability.png)" in md
    assert "- CPU only" in md
    assert "```yaml\nmethod: kd\ntrain:\n  steps: 300" in md


def test_html_is_self_contained(classifier_report):
    run_dir, written, _ = classifier_report
    html = written["html"].read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) == 3
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    # No external references of any kind: no links, scripts, stylesheets or URLs.
    assert not re.search(r'(href|src)="(?!data:)', html)
    assert "http://" not in html and "https://" not in html
    assert "<style>" in html and "<table>" in html and "Fashion-MNIST: KD vs CE" in html
    assert "CPU only" in html and "steps: 300" in html


def test_language_model_rows_without_reliability_or_histories(tmp_path):
    rows = [
        {"model": "teacher", "perplexity": 8.91, "parameters": 134_515_008},
        {"model": "student-kd", "perplexity": 12.3, "token_agreement": 0.61, "parameters": 20_000_000},
        {"model": "student-ce", "perplexity": None, "token_agreement": 0.55, "parameters": 20_000_000},
    ]
    written = write_report(tmp_path, title="LM <KD>", rows=rows, scatter=("parameters", "perplexity"))
    assert set(written) == {"metrics", "markdown", "html", "scatter"}
    md = written["markdown"].read_text()
    teacher_line = next(line for line in md.splitlines() if line.startswith("| teacher"))
    assert teacher_line.count("—") == 1  # token agreement is missing for the teacher
    assert "| student-ce | — | 20,000,000 | 55.00% |" in md
    assert "**61.00%**" in md  # the best token agreement is highlighted
    html = written["html"].read_text()
    assert "LM &lt;KD&gt;" in html and "<KD>" not in html


def test_missing_pieces_are_skipped(tmp_path):
    written = write_report(tmp_path, title="empty", rows=[], histories={"x": tmp_path / "absent.jsonl"})
    assert set(written) == {"metrics", "markdown", "html"}
    assert "No results" in written["markdown"].read_text()
    assert not (tmp_path / "plots").exists()


def test_explicit_columns_choose_and_name_what_is_shown(tmp_path):
    rows = [{"model": "a", "accuracy": 0.5, "secret": 1.0}]
    written = write_report(
        tmp_path, title="t", rows=rows, columns=[("model", "Name"), ("accuracy", "Top-1")], scatter=None
    )
    md = written["markdown"].read_text()
    assert "| Name | Top-1 |" in md and "secret" not in md.split("## Environment")[0]
    assert json.loads(written["metrics"].read_text())["rows"][0]["secret"] == 1.0


def test_load_history_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n\n{"step": 10, "loss": 0.5}\n{"step": 20, "lo')
    assert load_history(path) == [{"step": 0, "loss": 1.0}, {"step": 10, "loss": 0.5}]
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        load_history(path)
