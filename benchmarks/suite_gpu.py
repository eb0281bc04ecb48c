"""`gpu` suite: the one command to run when a GPU is lent (`make gpu-check`).

Parts (`PARTS`; `--parts` picks some), in the order of what matters most if the time runs out,
each started only when its usual time still fits the budget (`--budget-s`) and each recorded even
if a later one fails: the ceilings; the 5B denoising step side by side with diffusers eager and
compiled (`suite_step.py`, the summary's `step_5b`); the `ops` suite at CogVideoX sizes; the fp8
part (`suite_fp8.py`); the step with and without the CUDA graph on the tiny model (`suite_graph.py`:
host time per step); rebuilding the native extension; last, the GPU test files, with what time is
left, each failure's traceback kept. `make gpu-check` runs them all (the build and the tests get
what is left); `make gpu-test`, a second device call, runs the build and the tests alone. After every part the record is rewritten (JSON and markdown, atomically) and a
progress line printed, so a run stopped from outside keeps what it measured. On a machine without
CUDA, everything that needs it is recorded as skipped and the tiny model stands in, so that the
record-keeping itself is exercised.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .harness import ROOT, Row, ceilings
from .suite_fp8 import run_fp8
from .suite_graph import run_graph
from .suite_ops import run_ops
from .suite_step import CONFIGS, run_step

GPU_TESTS = ["tests/test_cuda.py"]
BUDGET_S = 430  # default --budget-s: `make gpu-check` must end inside the 8 minutes a device check may take
TEST_TIMEOUT_S = 90  # per GPU test: one that hangs must not take the others' time
TINY_GRAPH_STEPS = 10  # the tiny step takes milliseconds: more steps for steadier per-step times
# The parts in the order they run (`--parts` picks some); a part starts only if NEEDS_S[part] seconds
# are left (its usual time on an H100/H200, with margin). The step part stops starting pipelines when
# only what ops and fp8 need is left: those two decide `auto` and the FP8 gate, the build and the
# tests have a device call of their own (`make gpu-test`).
PARTS = ("ceilings", "step", "ops", "fp8", "graph", "build", "tests")
NEEDS_S = {"ceilings": 15, "step": 120, "ops": 45, "fp8": 90, "graph": 20, "build": 60, "tests": 60}
STEP_LEAVES = ("ops", "fp8")


def _skipped(case: str, why: str) -> Row:
    return Row("gpu", case, "-", extra=dict(skipped=why))


def _build_extension(device: torch.device, timeout_s: float) -> list[Row]:
    """Rebuild cvfast._C on a GPU machine (with its CUDA kernels, against that machine's torch)."""
    if device.type != "cuda":
        return [_skipped("build native extension", "no CUDA device: `make test` built the CPU extension")]
    start = time.perf_counter()
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        extra = dict(returncode=proc.returncode, tail=(proc.stdout + proc.stderr)[-2000:])
    except subprocess.TimeoutExpired:
        extra = dict(error=f"not built within {timeout_s:.0f} s")
    return [Row("gpu", "build native extension", "cmake", median_ms=(time.perf_counter() - start) * 1e3, extra=extra)]


def _gpu_tests(device: torch.device, timeout_s: float) -> list[Row]:
    """The GPU test files under `timeout_s` in all (`TEST_TIMEOUT_S` each): counts, the progress
    line, and each failure's report as it happened (tests/conftest.py writes them)."""
    if device.type != "cuda":
        return [_skipped("pytest " + " ".join(GPU_TESTS), "no CUDA device")]
    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "--tb=short", "-p", "no:cacheprovider",
               f"--timeout={TEST_TIMEOUT_S}", *GPU_TESTS]
    with tempfile.TemporaryDirectory() as tmp:
        failure_log = Path(tmp) / "failures.txt"
        env = dict(os.environ, CVFAST_FAILURE_LOG=str(failure_log))
        try:
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout_s)
            output, extra = proc.stdout, dict(returncode=proc.returncode)
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            extra = dict(error=f"stopped after {timeout_s:.0f} s (the suite's budget)")
        failures = failure_log.read_text() if failure_log.exists() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", output)}
    extra.update({f"passed_{k}" if k == "passed" else k: v for k, v in counts.items()})
    extra.update(progress=output.splitlines()[0][:200] if output else "", failures=failures[-20000:],
                 tail=output[-3000:])
    return [Row("gpu", "pytest " + " ".join(GPU_TESTS), "pytest", median_ms=(time.perf_counter() - start) * 1e3,
                extra=extra)]


def _guarded(name: str, fn) -> list[Row]:
    """Run one part; a failure becomes an error row and the suite goes on."""
    try:
        return fn()
    except Exception as exc:  # a broken part must not cost the other measurements
        return [Row("gpu", name, "-", extra=dict(error=f"{type(exc).__name__}: {exc}",
                                                  traceback=traceback.format_exc()[-3000:]))]


def run_gpu(args, device: torch.device, save) -> tuple[list[Row], dict, dict]:
    """The parts in order within `args.budget_s`; `save(rows, summary, ceilings)` after each."""
    start = time.perf_counter()
    deadline = start + args.budget_s
    gpu = device.type == "cuda"
    model = args.model if gpu else "tiny"
    size = dict(frames=args.frames, height=args.height, width=args.width) if gpu else \
        dict(frames=9, height=64, width=96)
    rows, summary, ceil = [], dict(model=model), {}

    def part(name: str, fn) -> None:
        left = deadline - time.perf_counter()
        if left < NEEDS_S[name] and gpu:
            rows.append(_skipped(name, f"{left:.0f} s of the budget left, the part needs about {NEEDS_S[name]} s"))
        else:
            if gpu:
                torch.cuda.empty_cache()
            rows.extend(_guarded(name, fn))
        summary.update(wall_s=time.perf_counter() - start, headline=_headline(rows))
        save(rows, summary, ceil)
        print(f"[gpu suite {time.perf_counter() - start:5.0f} s] {name}: done", flush=True)

    def ceilings_part() -> list[Row]:
        ceil.update(ceilings(device, args.dtype))
        return []

    def step_part() -> list[Row]:
        configs = list(CONFIGS) if gpu else ["auto", "auto+compile"]  # no graphs, no FP8 kernels on a CPU
        reserve = sum(NEEDS_S[name] for name in STEP_LEAVES if name in args.parts)
        step_rows, step_summary = run_step(model, device, args.dtype, configs=configs, deadline=deadline - reserve,
                                           **size)
        summary.update(step_summary)
        return step_rows

    parts = {"ceilings": ceilings_part, "step": step_part,
             "ops": lambda: run_ops(args.model, device, args.dtype, ceil, frames=args.frames, height=args.height,
                                    width=args.width),
             "fp8": lambda: run_fp8(device),
             "graph": lambda: run_graph("tiny", device, args.dtype, frames=9, height=64, width=96,
                                        steps=TINY_GRAPH_STEPS),
             "build": lambda: _build_extension(device, max(deadline - time.perf_counter() - NEEDS_S["tests"], 30)),
             "tests": lambda: _gpu_tests(device, max(deadline - time.perf_counter(), 30))}
    for name in PARTS:
        if name in args.parts:
            part(name, parts[name])
    return rows, summary, ceil


def _headline(rows: list[Row]) -> dict:
    """The ratios worth quoting: per fp8 case its ratio to bf16; per graph case, the graph's step
    speed-up, the memory it holds and whether it matched eager (the step part's are in `step_<model>`)."""
    out = {}
    for row in rows:
        if row.suite == "fp8" and "ratio_vs_bf16" in row.extra:
            out[f"{row.case} {row.backend}"] = {"ratio_vs_bf16": row.extra["ratio_vs_bf16"]}
        if row.suite == "graph" and row.backend == "cuda graph" and row.median_ms is not None:
            out[f"{row.case} cuda graph"] = {k: v for k, v in row.extra.items()
                                             if k.startswith(("speedup", "graph", "latents"))}
    return out
