"""Peak memory and time of large-vocabulary distillation losses on CPU: fused vs unfused vs TRL.

Every method starts from the same hidden states and output-projection weights, computes the
loss (forward) and the gradients to the student's hidden states and weight (backward):

- ``unfused``: logits of both models materialised, ``DIVERGENCES[div]`` on them, autograd;
- ``fused``:   ``kdkit.losses.fused.fused_linear_divergence`` (chunked, never holds all logits);
- ``trl``:     logits materialised, TRL's ``GKDTrainer.generalized_jsd_loss`` (jsd only);
- ``floor``:   the four large matrix multiplies any of them must do (teacher and student logits,
  d/d hidden and d/d weight) on the same shapes and chunks as fused, outputs preallocated: the
  hardware's floor. Each method's subprocess times floor steps interleaved with its own steps
  (floor, method, method, floor, ...), so "x floor" is a ratio measured side by side.

Each (case, method) runs in its own subprocess, strictly one after another, under an address-space
cap (RLIMIT_AS) plus an RSS watchdog in the parent; a case that would not fit is recorded as
"out of memory" / "over cap" or skipped up front from an estimate, never crashing the machine.
Peak memory = the subprocess's peak RSS (VmHWM) minus its RSS once the inputs exist.

    .venv/bin/python benchmarks/loss_memory.py --quick   # one small case -> runs/benchmarks/ (a smoke run)
    .venv/bin/python benchmarks/loss_memory.py           # the full table -> docs/benchmarks/loss_memory.md

On a GPU (or the CPU at a tiny size, to check the code paths) the in-process harness instead: every
case in one process, CUDA events, `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`,
one warm-up and one memory step per method, then `--repeats` (5) rounds in alternating order, each
with a floor step, so "x floor" is a per-round ratio; fused fkl/rkl/jsd, TRL's chunked loss
(`trl.trainer.distillation_trainer._chunked_divergence_loss`, Triton kernels on CUDA) and unfused
(skipped when it would not fit), at V in {49,152, 151,936}, H = 1,024 (2,048 at one size),
N in {4,096, 16,384}, bf16 and float32; JSON + markdown to --out (~60-80 s on an H200):

    PYTHONPATH=src python3 benchmarks/loss_memory.py --device cuda --out runs/loss_gpu
    PYTHONPATH=src python3 benchmarks/loss_memory.py --device cpu --quick --out /tmp/loss_cpu  # paths check
    PYTHONPATH=src python3 benchmarks/loss_memory.py --render runs/loss_gpu/loss_memory_device.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

GiB = 2**30
MiB = 2**20
REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks"

# Peak extra memory of each unfused method, in multiples of one model's float32 [N, V] logits,
# measured on this benchmark's smaller cases (forward + backward). Used only to skip cases that
# cannot fit before starting them; the cap still guards every run.
LOGIT_COPIES = {"unfused": 15.0, "trl": 17.0}
# Stop a run when the machine (shared with other jobs) has less than this available (GB).
LOW_MEMORY_GB = 1.5


@dataclass(frozen=True)
class Case:
    vocab: int
    tokens: int
    hidden: int
    divergence: str = "jsd"
    kwargs: tuple[tuple[str, float], ...] = (("beta", 0.5),)

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.kwargs)
        div = f"{self.divergence}({extra})" if extra else self.divergence
        return f"V={self.vocab:,} N={self.tokens:,} H={self.hidden:,} {div}"


@dataclass
class Result:
    case: Case
    method: str
    status: str  # "ok", "out of memory", "over cap", "skipped: ...", "error: ..."
    baseline_mb: float | None = None
    peak_mb: float | None = None  # peak RSS minus baseline RSS
    times_s: list[float] = field(default_factory=list)
    loss: float | None = None
    chunk_size: int | None = None
    floor_times_s: list[float] = field(default_factory=list)  # interleaved with times_s
    cpu_times_s: list[float] = field(default_factory=list)  # process CPU seconds of the same steps
    floor_cpu_times_s: list[float] = field(default_factory=list)

    @property
    def time_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def floor_s(self) -> float | None:
        return statistics.median(self.floor_times_s) if self.floor_times_s else None

    @property
    def floor_ratios(self) -> list[float]:
        """Per-round time / floor time (each round's two steps ran back to back)."""
        return [t / f for t, f in zip(self.times_s, self.floor_times_s)]

    @property
    def x_floor(self) -> float | None:
        return statistics.median(self.floor_ratios) if self.floor_times_s else None

    @property
    def cpu_floor_ratios(self) -> list[float]:
        return [t / f for t, f in zip(self.cpu_times_s, self.floor_cpu_times_s)]

    @property
    def x_floor_cpu(self) -> float | None:
        return statistics.median(self.cpu_floor_ratios) if self.floor_cpu_times_s else None


# ----------------------------------------------------------------------------------------------
# child: one (case, method) in this process


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    case = Case(**{**spec["case"], "kwargs": tuple(tuple(kv) for kv in spec["case"]["kwargs"])})
    method = spec["method"]
    kwargs = dict(case.kwargs)

    from kdkit.losses.divergences import DIVERGENCES
    from kdkit.losses.fused import auto_chunk_size, fused_linear_divergence

    if method == "fused_ref":  # another version of fused.py (e.g. from git), side by side
        import importlib.util

        ref_spec = importlib.util.spec_from_file_location("fused_ref", spec["reference_fused"])
        ref_module = importlib.util.module_from_spec(ref_spec)
        sys.modules["fused_ref"] = ref_module  # dataclasses look their module up there
        ref_spec.loader.exec_module(ref_module)
        ref_fused = ref_module.fused_linear_divergence
        ref_chunk = ref_module.auto_chunk_size(case.tokens, case.vocab)
    if method == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

    gen = torch.Generator().manual_seed(0)
    n, v, h = case.tokens, case.vocab, case.hidden
    # Scaled like a trained LM head: logits of order 1-10.
    h_s = torch.randn(n, h, generator=gen).requires_grad_(True)
    w_s = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_(True)
    h_t = torch.randn(n, h, generator=gen)
    w_t = torch.randn(v, h, generator=gen) * (2.0 / h**0.5)
    chunk = spec.get("chunk_size") or auto_chunk_size(n, v)
    # the reference version keeps its own automatic chunk size (None) unless one is given
    chunk_ref = spec.get("chunk_size")

    def step() -> float:
        h_s.grad = None
        w_s.grad = None
        if method in ("fused", "fused_ref"):
            fn = fused_linear_divergence if method == "fused" else ref_fused
            loss = fn(
                h_s,
                w_s,
                h_t,
                w_t,
                divergence=case.divergence,
                chunk_size=chunk_ref if method == "fused_ref" else chunk,
                **kwargs,
            )
        else:
            logits_s = h_s @ w_s.T
            with torch.no_grad():
                logits_t = h_t @ w_t.T
            if method == "unfused":
                loss = DIVERGENCES.get(case.divergence)(logits_s, logits_t, **kwargs)
            else:  # [N, V] input: TRL's "batchmean" divides by N, the per-token mean
                loss = GKDTrainer.generalized_jsd_loss(logits_s, logits_t, beta=kwargs["beta"])
        loss.backward()
        return float(loss)

    # One tiny step first, so that code loaded lazily on first use (kernels, autograd, TRL) is
    # in the baseline and not counted as the loss's memory.
    tiny = (h_s, w_s, h_t, w_t)
    h_s, w_s = h_s[:4].detach().requires_grad_(True), w_s[:64].detach().requires_grad_(True)
    h_t, w_t = h_t[:4], w_t[:64]
    step()
    h_s, w_s, h_t, w_t = tiny
    baseline_kb = _rss_kb("VmRSS")
    reset = _reset_peak_rss()
    # The tiny step above already loaded everything, so the first full step is timed too; a step
    # longer than `long_s` is timed once (two CPU cores are shared by the whole team), a shorter
    # one is taken as the warm-up and followed by `repeats` timed rounds. Each round also times one
    # floor step right before or after (alternating), so every ratio to the floor is side by side.
    start = time.perf_counter()
    value = step()
    times = [time.perf_counter() - start]
    peak_kb = _rss_kb("VmHWM")  # the method's own peak, before any floor step
    floor_times: list[float] = []
    # Process CPU seconds next to wall seconds: with one torch thread on a machine shared by many
    # jobs, CPU time is what this process computed, much less sensitive to the others' load.
    cpu_times: list[float] = []
    floor_cpu_times: list[float] = []
    # the floor uses the chunks of the method it is compared with (the reference picks its own)
    floor_chunk = (chunk_ref or ref_chunk) if method == "fused_ref" else chunk
    floor = _floor_step(h_s, w_s, h_t, w_t, floor_chunk) if spec.get("floor") else None
    if floor is not None:
        floor()  # warm-up (allocates its preallocated outputs)

    def timed(fn, wall: list[float], cpu: list[float]) -> None:  # type: ignore[no-untyped-def]
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)

    if times[0] > spec["long_s"]:
        if floor is not None:
            timed(floor, floor_times, floor_cpu_times)
    else:
        times = []
        for round_index in range(spec["repeats"]):
            order = ("floor", "method") if round_index % 2 == 0 else ("method", "floor")
            for what in order:
                if what == "floor" and floor is not None:
                    timed(floor, floor_times, floor_cpu_times)
                elif what == "method":
                    timed(step, times, cpu_times)
    return {
        "baseline_mb": baseline_kb / 1024,
        "peak_mb": (peak_kb - baseline_kb) / 1024,
        "times_s": times,
        "loss": value,
        "chunk_size": chunk
        if method == "fused"
        else (chunk_ref or (ref_chunk if method == "fused_ref" else None)),
        "peak_reset": reset,
        "floor_times_s": floor_times,
        "cpu_times_s": cpu_times,
        "floor_cpu_times_s": floor_cpu_times,
    }


def _floor_step(h_s, w_s, h_t, w_t, chunk: int):  # type: ignore[no-untyped-def]
    """The four matmuls of a fused step, same shapes and chunks, outputs preallocated once (in the
    inputs' dtype, on their device)."""
    import torch

    n, v, h = h_s.shape[0], w_s.shape[0], h_s.shape[1]
    rows = min(chunk, n)
    like = {"dtype": h_s.dtype, "device": h_s.device}
    logits_t, logits_s = torch.empty(rows, v, **like), torch.empty(rows, v, **like)
    grad_h, grad_w = torch.empty(n, h, **like), torch.empty(v, h, **like)
    hs, ws = h_s.detach(), w_s.detach()

    def run() -> None:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            a, b = logits_t[: stop - start], logits_s[: stop - start]
            torch.mm(h_t[start:stop], w_t.t(), out=a)
            torch.mm(hs[start:stop], ws.t(), out=b)
            torch.mm(b, ws, out=grad_h[start:stop])  # b stands in for d loss / d logits
            grad_w.addmm_(b.t(), hs[start:stop], beta=0.0 if start == 0 else 1.0)

    return run


# ----------------------------------------------------------------------------------------------
# parent: run cases one at a time under a cap


def _kb(path: str, name: str) -> int:
    """A `name: N kB` field of a /proc file (0 if unreadable, e.g. the process just ended)."""
    try:
        with open(path) as lines:
            return next(int(x.split()[1]) for x in lines if x.startswith(name + ":"))
    except (OSError, StopIteration):
        return 0


def _estimate_gb(case: Case, method: str) -> float:
    copies = LOGIT_COPIES.get(method)
    return 0.0 if copies is None else case.tokens * case.vocab * 4 * copies / GiB


def _run_one(case: Case, method: str, args: argparse.Namespace) -> Result:
    need = _estimate_gb(case, method)
    if need > args.cap_gb:
        return Result(case, method, f"skipped: needs ~{need:.0f} GB > cap {args.cap_gb:.0f} GB")
    spec = {
        "case": asdict(case),
        "method": method,
        "threads": args.threads,
        "repeats": args.repeats,
        "long_s": args.long_s,
        "chunk_size": args.chunk_size,
        "floor": not args.no_floor,
        "reference_fused": args.reference_fused,
    }
    cap = int(args.cap_gb * GiB)

    def limit() -> None:  # runs in the child before exec: allocations past the cap fail there
        resource.setrlimit(resource.RLIMIT_AS, (cap + 2 * GiB, cap + 2 * GiB))  # + code/libs

    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRL_EXPERIMENTAL_SILENCE": "1"},
    )
    over = ""
    while proc.poll() is None:  # watchdog: RLIMIT_AS counts address space, this real memory
        if _kb(f"/proc/{proc.pid}/status", "VmRSS") * 1024 > cap:
            over = f"over cap ({args.cap_gb:.0f} GB RSS)"
        elif _kb("/proc/meminfo", "MemAvailable") < LOW_MEMORY_GB * GiB / 1024:
            over = f"stopped: machine memory low (< {LOW_MEMORY_GB} GB available)"
        if over:
            proc.kill()
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if over:
        return Result(case, method, over)
    if proc.returncode != 0:
        text = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
        if "can't allocate memory" in err or "MemoryError" in err or "out of memory" in err.lower():
            return Result(case, method, "out of memory")
        return Result(case, method, f"error: {text[:120]}")
    data = json.loads(out.strip().splitlines()[-1])
    return Result(
        case,
        method,
        "ok",
        baseline_mb=data["baseline_mb"],
        peak_mb=data["peak_mb"],
        times_s=data["times_s"],
        loss=data["loss"],
        chunk_size=data["chunk_size"],
        floor_times_s=data.get("floor_times_s", []),
        cpu_times_s=data.get("cpu_times_s", []),
        floor_cpu_times_s=data.get("floor_cpu_times_s", []),
    )


def _cases(quick: bool) -> tuple[list[Case], list[Case]]:
    """(3-way jsd cases, fused-vs-unfused cases for other divergences)."""
    if quick:
        return [Case(8_192, 512, 256)], []
    main = [Case(v, n, h) for v in (49_152, 151_936) for n in (2_048, 8_192) for h in (576, 1_024)]
    # The largest vocabulary at 1,024 tokens: the one size where TRL's loss still fits there.
    main.insert(4, Case(151_936, 1_024, 1_024))
    others = [Case(49_152, 2_048, 576, div, ()) for div in ("fkl", "rkl")]
    return main, others


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _ratio(a: Result, b: Result | None, attr: str) -> str:
    if b is None or a.status != "ok" or b.status != "ok":
        return "–"
    return f"{getattr(a, attr) / getattr(b, attr):.3f}"


def _cell(r: Result | None) -> tuple[str, str]:
    if r is None:
        return "–", "–"
    if r.status != "ok":
        return r.status, "–"
    return f"{r.peak_mb:,.0f}", f"{r.time_s:.2f}"


def _machine() -> str:
    import torch

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    cpu = platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}, {cpu}), {ram:.1f} GiB RAM, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}"
    )


def _table(results: list[Result], methods: list[str]) -> list[str]:
    by = {(r.case, r.method): r for r in results}
    cases = list(dict.fromkeys(r.case for r in results))
    head = ["case", "floor s"]
    for m in methods:
        head += [f"{m} peak MB", f"{m} time s", f"{m} × floor", f"{m} × floor (CPU s)"]
    head += ["fused/unfused mem", "fused/unfused time"]
    if "trl" in methods:
        head += ["fused/TRL mem", "fused/TRL time"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        fused = by.get((case, "fused"))
        floors = [r.floor_s for m in methods if (r := by.get((case, m))) is not None and r.floor_s]
        row = [case.label, _fmt(statistics.median(floors) if floors else None, ".2f")]
        for m in methods:
            result = by.get((case, m))
            row += list(_cell(result))
            row += [_fmt(result.x_floor if result is not None else None, ".2f")]
            row += [_fmt(result.x_floor_cpu if result is not None else None, ".2f")]
        if fused is not None:
            row += [_ratio(fused, by.get((case, "unfused")), "peak_mb")]
            row += [_ratio(fused, by.get((case, "unfused")), "time_s")]
            if "trl" in methods:
                row += [_ratio(fused, by.get((case, "trl")), "peak_mb")]
                row += [_ratio(fused, by.get((case, "trl")), "time_s")]
        rows.append("| " + " | ".join(row) + " |")
    return rows


def _details(results: list[Result]) -> list[str]:
    rows = [
        "| case | method | status | baseline RSS MB | peak − baseline MB | times s | floor times s | "
        "per-round × floor | CPU s | floor CPU s | per-round × floor (CPU) | loss | chunk |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        times = ", ".join(f"{t:.2f}" for t in r.times_s) or "–"
        floors = ", ".join(f"{t:.2f}" for t in r.floor_times_s) or "–"
        ratios = ", ".join(f"{t:.2f}" for t in r.floor_ratios) or "–"
        cpu = ", ".join(f"{t:.2f}" for t in r.cpu_times_s) or "–"
        floor_cpu = ", ".join(f"{t:.2f}" for t in r.floor_cpu_times_s) or "–"
        cpu_ratios = ", ".join(f"{t:.2f}" for t in r.cpu_floor_ratios) or "–"
        rows.append(
            f"| {r.case.label} | {r.method} | {r.status} | {_fmt(r.baseline_mb, ',.0f')} | "
            f"{_fmt(r.peak_mb, ',.0f')} | {times} | {floors} | {ratios} | {cpu} | {floor_cpu} | "
            f"{cpu_ratios} | {_fmt(r.loss, '.6f')} | {r.chunk_size or '–'} |"
        )
    return rows


def _plot(results: list[Result], path: Path, cap_gb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["unfused", "trl", "fused"]
    cases = list(dict.fromkeys(r.case for r in results if r.case.divergence == "jsd"))
    by = {(r.case, r.method): r for r in results}
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(cases)), 4.5))
    width = 0.27
    for i, m in enumerate(methods):
        xs, ys = [], []
        for j, case in enumerate(cases):
            r = by.get((case, m))
            if r is not None and r.status == "ok":
                xs.append(j + (i - 1) * width)
                ys.append(r.peak_mb / 1024)
            elif r is not None:
                ax.text(j + (i - 1) * width, 0.1, "✗", ha="center", va="bottom", color="grey", fontsize=9)
        ax.bar(xs, ys, width, label={"trl": "TRL generalized_jsd_loss"}.get(m, f"kdkit {m}"))
    ax.axhline(cap_gb, color="red", linestyle="--", linewidth=1, label=f"cap {cap_gb:.0f} GB")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"V={c.vocab // 1000}k\nN={c.tokens}\nH={c.hidden}" for c in cases], fontsize=8)
    ax.set_ylabel("peak memory above inputs (GiB)")
    ax.set_title("JSD (β=0.5) forward + backward on CPU; ✗ = did not fit / skipped")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _load_range(args: argparse.Namespace) -> str:
    loads = getattr(args, "loads", [])
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "–"


def _write(results: list[Result], args: argparse.Namespace, command: str, elapsed: float) -> Path:
    out = Path(args.out) if args.out else (REPO / "runs" / "benchmarks" if args.quick else DOCS)
    out.mkdir(parents=True, exist_ok=True)
    name = "loss_memory"
    plot = out / f"{name}.png"
    _plot(results, plot, args.cap_gb)
    main = [r for r in results if r.case.divergence == "jsd"]
    others = [r for r in results if r.case.divergence != "jsd"]
    lines = [
        "# Memory and time of the large-vocabulary distillation loss (CPU)",
        "",
        f"Command: `{command}` (took {elapsed / 60:.1f} min)  ",
        f"Machine: {_machine()}; torch threads {args.threads}; 1-min load average at the end of each "
        f"run {_load_range(args)} (other jobs share the machine) — compare the ratios, which come from "
        "one run.",
        "",
        "Every method starts from the same float32 hidden states [N, H] and output weights [V, H] of a "
        "student and a teacher (both of width H), computes the loss and backpropagates to the student's "
        "hidden states and weight. *unfused*: both logits materialised + `DIVERGENCES[...]`; *fused*: "
        "`fused_linear_divergence` (chunk = tokens per chunk, chosen by `auto_chunk_size` unless set); "
        "*trl*: logits materialised + TRL's `GKDTrainer.generalized_jsd_loss`. *floor s*: the four "
        "large matmuls every method must do (teacher and student logits, d/d hidden, d/d weight) on "
        "the same shapes and chunks, outputs preallocated; it is timed inside each method's "
        "subprocess, one floor step next to each timed step (order alternating), and *× floor* is the "
        "median of those per-round ratios (per-round values in the details table); *× floor (CPU s)* "
        "is the same ratio of process CPU seconds (one torch thread), far less sensitive to other "
        "jobs' load than wall time. Peak MB = the "
        "subprocess's peak RSS minus its RSS after the inputs were created (baselines in the details "
        f"table). Each run is its own subprocess under a {args.cap_gb:.0f} GB cap (RLIMIT_AS + an RSS "
        "watchdog); cases whose estimated need (N × V × 4 bytes × "
        f"{LOGIT_COPIES['unfused']:.0f} for unfused, × {LOGIT_COPIES['trl']:.0f} for TRL) exceeds the "
        "cap are skipped up front, and a run is stopped if the machine's available memory falls under "
        f"{LOW_MEMORY_GB} GB (other jobs share it). Before measuring, each subprocess runs one tiny step so "
        "lazily loaded code is in the baseline. Time = median of "
        f"{args.repeats} timed steps after one warm-up step; a case whose first step took over "
        f"{args.long_s:.0f} s is timed by that one step.",
        "",
        "## Generalized JSD, β = 0.5: unfused vs fused vs TRL",
        "",
        *_table(
            main, [m for m in ("unfused", "trl", "fused_ref", "fused") if any(r.method == m for r in main)]
        ),
        "",
        f"![peak memory]({plot.name})",
        "",
    ]
    if others:
        lines += [
            "## Other divergences: fused vs unfused",
            "",
            *_table(
                others, [m for m in ("unfused", "fused_ref", "fused") if any(r.method == m for r in others)]
            ),
            "",
        ]
    lines += ["## Details", "", *_details(results), ""]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines))
    (out / f"{name}.json").write_text(
        json.dumps(
            [{**asdict(r), "case": asdict(r.case), "time_s": r.time_s} for r in results],
            indent=1,
        )
    )
    return path


# ----------------------------------------------------------------------------------------------
# in-process harness for one device (--device cuda|cpu): CUDA events, torch's peak-memory counters


@dataclass(frozen=True)
class DeviceCase:
    vocab: int
    tokens: int
    hidden: int
    dtype: str  # "float32" | "bfloat16"

    @property
    def label(self) -> str:
        return f"V={self.vocab:,} N={self.tokens:,} H={self.hidden:,} {self.dtype}"

    @property
    def matmul_flop(self) -> float:
        """The four large matmuls of one step: 2 projections + 2 gradient products, 2·N·V·H each."""
        return 8.0 * self.tokens * self.vocab * self.hidden


# method name -> (kind, divergence, kwargs); TRL's beta: 0 = forward KL, 1 = reverse KL, as kdkit's jsd
DEVICE_METHODS: dict[str, tuple[str, str, dict[str, float]]] = {
    "floor": ("floor", "", {}),
    "floor_unchunked": ("floor_unchunked", "", {}),
    "fused_fkl": ("fused", "fkl", {}),
    "fused_rkl": ("fused", "rkl", {}),
    "fused_jsd": ("fused", "jsd", {"beta": 0.5}),
    # jsd at half the automatic chunk: what a smaller memory budget costs (bf16 cases only)
    "fused_jsd_half_chunk": ("fused_half_chunk", "jsd", {"beta": 0.5}),
    # the closed forms compiled (KDKIT_FUSED_COMPILE=1; bf16 cases only; compiled in the warm-up)
    "fused_fkl_compiled": ("fused_compiled", "fkl", {}),
    "fused_rkl_compiled": ("fused_compiled", "rkl", {}),
    "fused_jsd_compiled": ("fused_compiled", "jsd", {"beta": 0.5}),
    "trl_jsd": ("trl", "jsd", {"beta": 0.5}),
    "unfused_jsd": ("unfused", "jsd", {"beta": 0.5}),
}
# fkl/rkl compiled are left out by default: each compiles for ~10 s more of a ~90 s run.
DEFAULT_DEVICE_METHODS = [m for m in DEVICE_METHODS if m not in ("fused_fkl_compiled", "fused_rkl_compiled")]
# The kinds of method also run on float32 inputs (the others on bf16 only, to keep the run short).
BOTH_DTYPES = ("floor", "fused", "trl", "unfused")
# Peak extra memory of the unfused loss in multiples of one model's float32 [N, V] logits (its
# autograd graph keeps ~12-16 [N, V] float32 intermediates); a case is skipped up front above it.
UNFUSED_COPIES = 16.0


def _device_cases(quick: bool) -> list[DeviceCase]:
    if quick:
        return [DeviceCase(4_096, 192, 64, dtype) for dtype in ("bfloat16", "float32")]
    shapes = [(v, n, 1_024) for v in (49_152, 151_936) for n in (4_096, 16_384)]
    # bf16 first (how LMs train; H = 2,048 at one size too), then float32; within each the cheap
    # cases first, so that what a budget cut leaves out is the largest float32 case.
    bf16 = [DeviceCase(v, n, h, "bfloat16") for v, n, h in shapes]
    bf16.insert(3, DeviceCase(151_936, 4_096, 2_048, "bfloat16"))
    return bf16 + [DeviceCase(v, n, h, "float32") for v, n, h in shapes]


class _Timer:
    """Wall time of a step: CUDA events on a GPU (read after a synchronize), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def time(self, fn) -> Callable[[], float]:  # type: ignore[no-untyped-def]
        """Runs fn; returns a callable that gives its seconds (synchronising on first call)."""
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return lambda: (end.synchronize(), start.elapsed_time(end) / 1000.0)[1]
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        return lambda: seconds


def _device_steps(case: DeviceCase, device: torch.device, methods: list[str]):  # type: ignore[no-untyped-def]
    """(inputs, {method: step}) for one case; each step does forward + backward (or the floor)."""
    import torch

    from kdkit.losses import fused as fused_module
    from kdkit.losses.divergences import DIVERGENCES
    from kdkit.losses.fused import auto_chunk_size, fused_linear_divergence

    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    n, v, h = case.tokens, case.vocab, case.hidden

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    # Scaled like a trained LM head: logits of order 1-10.
    h_s = randn(n, h).requires_grad_(True)
    w_s = randn(v, h, scale=h**-0.5).requires_grad_(True)
    h_t = randn(n, h)
    w_t = randn(v, h, scale=2.0 * h**-0.5)
    mask = torch.ones(n, dtype=torch.bool, device=device)  # a training batch's mask: all count here
    chunk = auto_chunk_size(n, v, device=device)
    steps = {}

    def clear() -> None:
        h_s.grad = None
        w_s.grad = None

    def floor_step(rows_per_call: int):  # type: ignore[no-untyped-def]
        return _floor_step(h_s, w_s, h_t, w_t, rows_per_call)

    def loss_step(kind: str, divergence: str, kwargs: dict[str, float]):  # type: ignore[no-untyped-def]
        if kind == "trl":
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def run() -> float:
            clear()
            if kind.startswith("fused"):
                size = max(8, chunk // 2) if kind == "fused_half_chunk" else chunk
                fused_module.COMPILE_CLOSED_FORMS = kind == "fused_compiled"
                try:
                    loss = fused_linear_divergence(
                        h_s, w_s, h_t, w_t, divergence=divergence, mask=mask, chunk_size=size, **kwargs
                    )
                finally:
                    fused_module.COMPILE_CLOSED_FORMS = False
            elif kind == "trl":
                loss = _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, beta=kwargs["beta"])[0]
            else:
                logits_s = h_s @ w_s.T
                with torch.no_grad():
                    logits_t = h_t @ w_t.T
                loss = DIVERGENCES.get(divergence)(logits_s, logits_t, mask=mask, **kwargs)
                del logits_s, logits_t
            loss.backward()
            return loss

        return run

    for method in methods:
        kind, divergence, kwargs = DEVICE_METHODS[method]
        if kind == "floor":
            steps[method] = floor_step(chunk)
        elif kind == "floor_unchunked":
            steps[method] = floor_step(n)
        else:
            try:
                steps[method] = loss_step(kind, divergence, kwargs)
            except Exception as error:  # noqa: BLE001 - e.g. TRL not importable: that method only
                steps[method] = _failing(f"{type(error).__name__}: {str(error)[:300]}")
    return (h_s, w_s, h_t, w_t), chunk, steps


def _failing(message: str):  # type: ignore[no-untyped-def]
    def run() -> None:
        raise RuntimeError(message)

    return run


def _device_case(case: DeviceCase, device: torch.device, args: argparse.Namespace) -> dict:
    """Warm-up and peak memory per method, then `repeats` rounds of every method (order alternating)."""
    import torch

    from kdkit.losses import fused as fused_module

    cuda = device.type == "cuda"
    methods = [m for m in args.device_methods if m in DEVICE_METHODS]
    if case.dtype == "float32":  # the float32 cases are the slow ones; these questions are bf16's
        methods = [m for m in methods if m != "floor_unchunked" and DEVICE_METHODS[m][0] in BOTH_DTYPES]
    record: dict = {"case": asdict(case), "methods": {}}
    try:
        inputs, chunk, steps = _device_steps(case, device, methods)
    except Exception as error:  # noqa: BLE001 - one case's failure must not end the run
        record["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        return record
    record["chunk_size"] = chunk
    record["input_mb"] = sum(t.numel() * t.element_size() for t in inputs) / MiB
    timer = _Timer(device)
    results = {m: {"status": "ok", "times_s": []} for m in methods}
    free = torch.cuda.mem_get_info(device)[0] if cuda else None
    for method in methods:
        entry = results[method]
        kind = DEVICE_METHODS[method][0]
        if kind == "unfused" and free is not None:
            need = case.tokens * case.vocab * 4 * UNFUSED_COPIES
            if need > 0.9 * free:
                entry["status"] = f"skipped: needs ~{need / GiB:.0f} GiB > 90% of {free / GiB:.0f} GiB free"
                continue
        try:
            value = steps[method]()  # warm-up: kernels load / compile (Triton), the allocator grows
            if value is not None:
                entry["loss"] = float(value.detach())
            if kind == "fused_compiled" and fused_module._COMPILED.get("fn") is None:
                # the loss fell back to its eager forms: say so rather than time them under this name
                entry["status"] = f"error: compile failed: {fused_module._COMPILED.get('error', '?')[:300]}"
        except torch.cuda.OutOfMemoryError:
            entry["status"] = "out of memory"
        except Exception as error:  # noqa: BLE001
            entry["status"] = f"error: {type(error).__name__}: {str(error)[:300]}"
        if cuda and entry["status"] != "ok":
            torch.cuda.empty_cache()
    live = [m for m in methods if results[m]["status"] == "ok"]
    for round_index in range(args.repeats):
        order = live if round_index % 2 == 0 else live[::-1]
        pending = []
        for method in order:
            if round_index == 0 and cuda:  # peak memory of this step alone (allocator stats: host side)
                for tensor in inputs:
                    tensor.grad = None  # the previous method's gradients are not this one's memory
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            try:
                pending.append((method, timer.time(steps[method])))
            except torch.cuda.OutOfMemoryError:
                results[method]["status"] = "out of memory (while timing)"
                torch.cuda.empty_cache()
                continue
            except Exception as error:  # noqa: BLE001
                results[method]["status"] = f"error while timing: {type(error).__name__}: {str(error)[:200]}"
                continue
            if round_index == 0 and cuda:
                results[method]["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / MiB
        for method, seconds in pending:
            results[method]["times_s"].append(seconds())
        live = [m for m in live if results[m]["status"] == "ok"]
    floor = results.get("floor", {}).get("times_s") or []
    for entry in results.values():
        times = entry["times_s"]
        if times:
            entry["time_s"] = statistics.median(times)
            entry["tflops"] = case.matmul_flop / entry["time_s"] / 1e12
        if times and len(floor) == len(times):  # per-round ratios: both steps ran in the same round
            entry["x_floor_rounds"] = [t / f for t, f in zip(times, floor)]
            entry["x_floor"] = statistics.median(entry["x_floor_rounds"])
    record["methods"] = results
    del steps, inputs
    if cuda:
        torch.cuda.empty_cache()
    return record


def _device_run(args: argparse.Namespace, command: str) -> Path:
    import torch

    from kdkit.losses.fused import _half_mode

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    out = Path(args.out) if args.out else REPO / "runs" / "benchmarks" / f"loss_memory_{device.type}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "loss_memory_device.json"
    try:
        import trl

        trl_version = trl.__version__
    except Exception as error:  # noqa: BLE001
        trl_version = f"unavailable ({type(error).__name__})"
    report: dict = {
        "command": command,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _machine(),
        "torch": torch.__version__,
        "trl": trl_version,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "half_matmul_mode": {d: _half_mode(device, getattr(torch, d)) for d in ("bfloat16", "float16")},
        "repeats": args.repeats,
        "cases": [],
    }
    started = time.perf_counter()
    # seconds of timed + warm-up steps per matmul FLOP, per dtype, from the last case run: a case
    # that would end past the budget is not started (compile and load times are not in the rate)
    rates: dict[str, float] = {}
    for case in _device_cases(args.quick) if not args.case else _picked_device_cases(args.case):
        predicted = rates.get(case.dtype, 0.0) * case.matmul_flop
        if time.perf_counter() - started + predicted > args.budget_s:
            cut = f"not run: would end past the {args.budget_s:.0f} s budget (~{predicted:.0f} s)"
            report["cases"].append({"case": asdict(case), "error": cut})
            print(f"{case.label:<40} {cut}", flush=True)
        else:
            t0 = time.perf_counter()
            record = _device_case(case, device, args)
            record["wall_s"] = time.perf_counter() - t0
            report["cases"].append(record)
            step_s = sum(r.get("time_s", 0.0) for r in record.get("methods", {}).values())
            if step_s:
                rates[case.dtype] = step_s * (args.repeats + 1) / case.matmul_flop
            summary = "  ".join(
                f"{m} {r['x_floor']:.2f}x" if "x_floor" in r else f"{m} {r['status'][:40]}"
                for m, r in record.get("methods", {}).items()
            )
            floor_s = record.get("methods", {}).get("floor", {}).get("time_s")
            print(
                f"{case.label:<40} floor {_fmt(floor_s and floor_s * 1e3, '.1f')} ms  {summary}"
                f"  {record.get('error', '')} ({record['wall_s']:.1f} s)",
                flush=True,
            )
        report["elapsed_s"] = time.perf_counter() - started
        path.write_text(json.dumps(report, indent=1))  # partial results survive a crash
    (out / "loss_memory_device.md").write_text("\n".join(_render(report)) + "\n")
    print(f"wrote {path} ({report['elapsed_s']:.0f} s)", flush=True)
    return path


def _picked_device_cases(texts: list[str]) -> list[DeviceCase]:
    cases = []
    for text in texts:
        vocab, tokens, hidden, *dtype = text.split(",")
        for name in dtype or ["bfloat16", "float32"]:
            cases.append(DeviceCase(int(vocab), int(tokens), int(hidden), name))
    return cases


def _render(report: dict) -> list[str]:
    """Markdown tables (summary, then per-round details) from a `--device` run's JSON."""
    names = [m for m in DEVICE_METHODS if any(m in c.get("methods", {}) for c in report["cases"])]
    lines = [
        f"Device: {report['device']}; torch {report['torch']}, TRL {report['trl']}; TF32 matmuls "
        f"{'on' if report['tf32_matmul'] else 'off'}; half-precision matmul path: "
        f"{report['half_matmul_mode']}; {report['repeats']} timed rounds per case (median), "
        f"whole run {report.get('elapsed_s', 0):.0f} s.",
        "",
        "Each cell: median over rounds of (step time / floor time in the same round) · peak memory "
        "allocated above the inputs during one step (forward + backward, gradients included). *floor*: "
        "the four matmuls (both projections, G·W, Gᵀ·h) in the inputs' dtype at fused's chunk size, "
        "outputs preallocated; *floor_unchunked*: the same with all N tokens in one call.",
        "",
    ]
    head = ["case", "chunk", "floor ms", "floor TFLOP/s"] + [m for m in names if m != "floor"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for record in report["cases"]:
        case = DeviceCase(**record["case"])
        results = record.get("methods", {})
        if not results:
            lines.append(f"| {case.label} | {record.get('error', '–')} |" + " |" * (len(head) - 2))
            continue
        floor = results.get("floor", {})
        row = [case.label, str(record.get("chunk_size", "–"))]
        row += [_fmt(floor.get("time_s") and floor["time_s"] * 1e3, ".1f"), _fmt(floor.get("tflops"), ".0f")]
        for m in names:
            r = results.get(m)
            if m == "floor":
                continue
            if r is None:
                row.append("–")
            elif r["status"] != "ok":
                row.append(r["status"][:60])
            else:
                cell = f"**{_fmt(r.get('x_floor'), '.2f')}×**"
                if r.get("peak_mb") is not None and not m.startswith("floor"):
                    cell += f" · {r['peak_mb']:,.0f} MB"
                row.append(cell)
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Per-round times (ms) and losses:",
        "",
        "| case | method | times ms | × floor per round | loss |",
    ]
    lines.append("|---|---|---|---|---|")
    for record in report["cases"]:
        for m, r in record.get("methods", {}).items():
            times = ", ".join(f"{t * 1e3:.1f}" for t in r.get("times_s", [])) or r["status"]
            ratios = ", ".join(f"{x:.2f}" for x in r.get("x_floor_rounds", [])) or "–"
            label = DeviceCase(**record["case"]).label
            lines.append(f"| {label} | {m} | {times} | {ratios} | {_fmt(r.get('loss'), '.6f')} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one small case (a smoke run)")
    parser.add_argument("--cap-gb", type=float, default=18.0, help="memory cap per subprocess (GB)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after the warm-up")
    parser.add_argument(
        "--long-s", type=float, default=15.0, help="a first step longer than this is the timing"
    )
    parser.add_argument("--budget-min", type=float, default=80.0, help="skip what is left after this long")
    parser.add_argument("--chunk-size", type=int, default=None, help="fused chunk (tokens); default auto")
    parser.add_argument("--methods", default="unfused,trl,fused", help="comma-separated subset")
    parser.add_argument(
        "--case",
        action="append",
        help="run only this case, 'VOCAB,TOKENS,HIDDEN' (e.g. 49152,2048,576); repeatable",
    )
    parser.add_argument(
        "--divergence", default="jsd", help="with --case: the divergence (default jsd, β=0.5)"
    )
    parser.add_argument("--no-floor", action="store_true", help="do not time the matmul floor")
    parser.add_argument(
        "--reference-fused",
        help="method fused_ref: another fused.py to compare (git show REV:src/kdkit/losses/fused.py > f.py)",
    )
    parser.add_argument("--out", help="output folder (default docs/benchmarks; runs/benchmarks with --quick)")
    parser.add_argument(
        "--device",
        help="cuda or cpu: the in-process harness on that device (CUDA events, torch's peak-memory "
        "counters; all cases of one dtype in one process) instead of the CPU subprocess harness",
    )
    parser.add_argument(
        "--device-methods",
        default=",".join(DEFAULT_DEVICE_METHODS),
        help="with --device: comma-separated subset of " + ", ".join(DEVICE_METHODS),
    )
    parser.add_argument(
        "--budget-s", type=float, default=85.0, help="with --device: start no case that would end later"
    )
    parser.add_argument("--render", metavar="JSON", help="print the markdown tables of a --device run's JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    if args.render:
        print("\n".join(_render(json.loads(Path(args.render).read_text()))))
        return
    if args.device:
        args.device_methods = args.device_methods.split(",")
        if "--repeats" not in (argv if argv is not None else sys.argv):
            args.repeats = 5  # the CPU harness's default is 2
        command = "python benchmarks/loss_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
        _device_run(args, command.strip())
        return

    command = "python benchmarks/loss_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    methods = args.methods.split(",")
    main_cases, other_cases = _cases(args.quick)
    if args.case:
        picked = []
        for text in args.case:
            vocab, tokens, hidden = (int(x) for x in text.split(","))
            kwargs: tuple[tuple[str, float], ...] = (("beta", 0.5),) if args.divergence == "jsd" else ()
            picked.append(Case(vocab, tokens, hidden, args.divergence, kwargs))
        main_cases, other_cases = (picked, []) if args.divergence == "jsd" else ([], picked)
    # Method order alternates from case to case (A B C, C B A, ...), so a slow drift in the machine's
    # load does not always land on the same method.
    jobs = [(c, m) for i, c in enumerate(main_cases) for m in (methods if i % 2 == 0 else methods[::-1])]
    jobs += [
        (c, m)
        for i, c in enumerate(other_cases)
        for m in (methods if i % 2 == 0 else methods[::-1])
        if m != "trl"
    ]
    results: list[Result] = []
    loads: list[float] = []
    started = time.perf_counter()
    for case, method in jobs:
        t0 = time.perf_counter()
        if t0 - started > args.budget_min * 60:
            result = Result(case, method, f"not run: past the {args.budget_min:.0f} min budget")
        else:
            result = _run_one(case, method, args)
            loads.append(os.getloadavg()[0])  # 1-min load average as the run ends
        results.append(result)
        args.loads = loads
        _write(results, args, command.strip(), time.perf_counter() - started)  # partial results survive
        peak = _fmt(result.peak_mb, ",.0f")
        print(
            f"{case.label:<40} {method:<8} {result.status:<40} peak {peak} MB  "
            f"time {_fmt(result.time_s, '.2f')} s  ({time.perf_counter() - t0:.0f} s wall)",
            flush=True,
        )
    path = _write(results, args, command.strip(), time.perf_counter() - started)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
