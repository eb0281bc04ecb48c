"""What every suite shares: timing, the environment record, the device's measured ceilings, and the
result rows that `run.py` prints as a table and writes as JSON."""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One measurement. Times in ms; tflops/gbps achieved from the counted work; peak_gib is the
    CUDA allocator's peak during the timed calls (None on the CPU)."""
    suite: str
    case: str
    backend: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    peak_gib: float | None = None
    extra: dict = field(default_factory=dict)  # ratios, fractions of ceilings, shapes, notes

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, iters: int = 5) -> dict:
    """Wall time of `fn` (synchronised around each call): median, p20, p80 in ms, and peak memory."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return dict(median_ms=statistics.median(times), p20_ms=pick(0.2), p80_ms=pick(0.8), peak_gib=peak)


# A row whose 80th-percentile time exceeds its 20th by this factor is flagged: on a shared CPU a
# neighbour's job, on a GPU clocks still ramping, make the median unquotable.
UNSTEADY_SPREAD = 1.5


def measured_row(suite: str, case: str, backend: str, fn, device, *, flops: float | None = None,
                 bytes_moved: float | None = None, warmup: int = 1, iters: int = 5, **extra) -> Row:
    stats = timed(fn, device, warmup=warmup, iters=iters)
    seconds = stats["median_ms"] / 1e3
    row = Row(suite, case, backend, stats["median_ms"], stats["p20_ms"], stats["p80_ms"],
              tflops=flops / seconds / 1e12 if flops else None,
              gbps=bytes_moved / seconds / 1e9 if bytes_moved else None,
              peak_gib=stats["peak_gib"], extra=dict(iters=iters, **extra))
    spread = stats["p80_ms"] / stats["p20_ms"]
    if spread > UNSTEADY_SPREAD:
        row.extra["unsteady_p80_over_p20"] = spread
        print(f"warning: {suite} {case} {backend}: p80/p20 = {spread:.2f} > {UNSTEADY_SPREAD}; the machine was "
              "busy or the case too short: do not quote this row", file=sys.stderr)
    return row


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return None
    return out if len(out) == 40 else None  # a copy of the tree without history has none


def environment(device: torch.device) -> dict:
    import cvfast
    env = dict(python=platform.python_version(), torch=torch.__version__, cvfast=cvfast.__version__,
               git_commit=git_commit(), device_type=device.type, cpu=platform.processor() or platform.machine(),
               cpu_threads=torch.get_num_threads(), load_average=os.getloadavg())
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                   memory_gib=round(props.total_memory / 2 ** 30, 1), capability=f"{props.major}.{props.minor}")
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip() or None
        except OSError:
            env["driver"] = None
    else:
        env["device_name"] = "cpu"
    return env


def ceilings(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Measured once per run: matmul TFLOP/s in the run's dtype (bf16 on a GPU; a CPU emulates bf16
    slowly, so there the run's fp32 is the fair ceiling) and device-to-device copy GB/s (read +
    write). Sizes: on a GPU an 8192^3 product and a 2 GiB copy (many times the L2); on a CPU small
    enough to take a second."""
    gpu = device.type == "cuda"
    n = 8192 if gpu else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    mm = timed(lambda: a @ b, device, warmup=2, iters=10 if gpu else 3)
    numel = 2 ** 30 if gpu else 2 ** 24
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    cp = timed(lambda: dst.copy_(src), device, warmup=2, iters=10 if gpu else 3)
    return dict(matmul_tflops=2 * n ** 3 / (mm["median_ms"] / 1e3) / 1e12, matmul_n=n,
                matmul_dtype=str(dtype).replace("torch.", ""),
                copy_gbps=2 * numel * 2 / (cp["median_ms"] / 1e3) / 1e9, copy_bytes=numel * 2)


def of_ceiling(row: Row, ceil: dict) -> Row:
    """Add the row's achieved throughput as a fraction of the measured ceilings."""
    if row.tflops is not None:
        row.extra["frac_matmul_ceiling"] = row.tflops / ceil["matmul_tflops"]
    if row.gbps is not None:
        row.extra["frac_copy_ceiling"] = row.gbps / ceil["copy_gbps"]
    return row


def format_table(rows: list[Row]) -> str:
    head = f"{'suite':9s} {'case':46s} {'backend':10s} {'median ms':>11s} {'p20-p80 ms':>19s} {'TFLOP/s':>8s} {'GB/s':>8s} {'peak GiB':>8s}"
    lines = [head, "-" * len(head)]
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        spread = "" if r.p20_ms is None else f"{r.p20_ms:.3g}-{r.p80_ms:.3g}"
        lines.append(f"{r.suite:9s} {r.case[:46]:46s} {r.backend:10s} {fmt(r.median_ms, '11.4g')} {spread:>19s} "
                     f"{fmt(r.tflops, '8.3g')} {fmt(r.gbps, '8.3g')} {fmt(r.peak_gib, '8.2f')}")
        notes = {k: v for k, v in r.extra.items() if k.startswith(("speedup", "frac", "ratio", "skipped", "error", "latents", "passed",
                                                                  "host", "graph", "unsteady"))}
        if notes:
            lines.append(" " * 10 + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in notes.items()))
    return "\n".join(lines)


def markdown(record: dict) -> str:
    """A short table of one run (any suite), written beside its JSON."""
    env, ceil = record["env"], record["ceilings"]
    lines = [f"# {record['suite']} suite, {env.get('device_name')} ({record['date']})", "",
             f"torch {env['torch']}, CUDA {env.get('cuda')}, driver {env.get('driver')}, triton {env.get('triton')}, "
             f"cvfast {env['cvfast']} at {env.get('git_commit') or 'an uncommitted tree'}.", ""]
    if ceil:
        lines += [f"Measured ceilings: {ceil['matmul_dtype']} matmul {ceil['matmul_tflops']:.0f} TFLOP/s, "
                  f"copy {ceil['copy_gbps']:.0f} GB/s (read + write).", ""]
    for key, step in record["summary"].items():
        if key.startswith("step_") and isinstance(step, dict) and "cvfast_s" in step:  # the step part's
            seconds = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
            lines += [f"Denoising step ({step['shape']}, {step['dtype']}, {step['device']}), seconds: diffusers eager "
                      f"{seconds(step['diffusers_eager_s'])}, diffusers compiled {seconds(step['diffusers_compiled_s'])}"
                      "; cvfast " + ", ".join(f"{name} {seconds(v)}" for name, v in step["cvfast_s"].items())
                      + "".join(f"; {label} ({step[label]}) / {k[len(label) + 4:]} {v:.3g}"
                                for label in ("best", "best_bf16") if label in step
                                for k, v in step.items() if k.startswith(f"{label}_vs_"))
                      + "; a 50-step generation projected from step and decode: "
                      + ", ".join(f"{name} {seconds(v)}" for name, v in step["projected_50_steps_s"].items()), ""]
    lines += ["| suite | case | backend | median ms | TFLOP/s | GB/s | notes |", "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        notes = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["extra"].items()
                          if k.startswith(("speedup", "frac", "latents", "skipped", "error", "passed", "failed",
                                           "host", "graph", "ratio", "output", "weight", "compile", "progress", "unsteady")))
        num = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['suite']} | {r['case']} | {r['backend']} | {num(r['median_ms'], '.4g')} | "
                     f"{num(r['tflops'], '.3g')} | {num(r['gbps'], '.3g')} | {notes} |")
    return "\n".join(lines) + "\n"
