"""`gpu` suite: the one command to run when a GPU is lent.

In order, each part recorded even if a later one fails: build the native extension (when csrc/ has
sources), run the GPU test files, measure the ceilings, the `ops` suite at CogVideoX sizes, and the
`e2e` suite at CogVideoX-2B 49x480x720 with random weights for the reference and auto backends and
diffusers (same weights, same run) when it is importable; then, if the run is still under
`FIVE_B_AFTER_S`, the 5B e2e for auto and diffusers; last, the denoising step with and without the
CUDA graph (`suite_graph.py`: step and host time per step, the memory the graph holds) on the tiny
model and at CogVideoX-2B 49x480x720; then, if the run is still under `FP8_AFTER_S`, the fp8 part
(`suite_fp8.py`: FP8 linears, the 8-bit attention and the 5B step against bf16, and the accuracy
gate). Sized to finish in about 6.5 minutes on an H100 or H200. On a
machine without CUDA, everything that needs it is recorded as skipped, and the tiny model stands in
for the e2e part (and runs the graph part's eager half) so that the record-keeping itself is
exercised.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
import traceback

import torch

from .harness import ROOT, Row, ceilings
from .suite_e2e import run_e2e
from .suite_fp8 import run_fp8
from .suite_graph import run_graph
from .suite_ops import run_ops

GPU_TESTS = ["tests/test_cuda.py"]
FIVE_B_AFTER_S = 200  # start the optional 5B e2e only if the run is younger than this
FP8_AFTER_S = 330     # and the fp8 part (about 90 s at 5B size) only if younger than this: 8 minutes in all
TINY_GRAPH_STEPS = 10  # the tiny step takes milliseconds: more steps for steadier per-step times


def _skipped(case: str, why: str) -> Row:
    return Row("gpu", case, "-", extra=dict(skipped=why))


def _build_extension(device: torch.device) -> Row:
    """Rebuild cvfast._C on a GPU machine (with its CUDA kernels, against that machine's torch)."""
    if device.type != "cuda":
        return _skipped("build native extension", "no CUDA device: `make test` built the CPU extension")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                           str(ROOT)], capture_output=True, text=True)
    return Row("gpu", "build native extension", "cmake", median_ms=(time.perf_counter() - start) * 1e3,
               extra=dict(returncode=proc.returncode, tail=(proc.stdout + proc.stderr)[-2000:]))


def _gpu_tests(device: torch.device) -> Row:
    if device.type != "cuda":
        return _skipped("pytest " + " ".join(GPU_TESTS), "no CUDA device")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS],
                          capture_output=True, text=True, cwd=ROOT)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout)}
    return Row("gpu", "pytest " + " ".join(GPU_TESTS), "pytest", median_ms=(time.perf_counter() - start) * 1e3,
               extra=dict(returncode=proc.returncode, **{f"passed_{k}" if k == "passed" else k: v
                                                        for k, v in counts.items()},
                          tail=proc.stdout[-3000:]))


def _guarded(name: str, fn) -> list[Row]:
    """Run one part; a failure becomes an error row and the suite goes on."""
    try:
        return fn()
    except Exception as exc:  # a broken part must not cost the other measurements
        return [Row("gpu", name, "-", extra=dict(error=f"{type(exc).__name__}: {exc}",
                                                  traceback=traceback.format_exc()[-3000:]))]


def run_gpu(args, device: torch.device) -> tuple[list[Row], dict, dict]:
    start = time.perf_counter()
    rows = [_build_extension(device), _gpu_tests(device)]
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.empty_cache()
    ceil = ceilings(device, args.dtype)
    rows += _guarded("ops", lambda: run_ops(args.model, device, args.dtype, ceil, frames=args.frames,
                                            height=args.height, width=args.width))
    model = args.model if gpu else "tiny"
    if not gpu and args.model != "tiny":
        rows.append(_skipped(f"e2e {args.model}", "no CUDA device: the tiny model stands in"))
    size = dict(frames=args.frames, height=args.height, width=args.width) if model != "tiny" else \
        dict(frames=9, height=64, width=96)
    rows += _guarded(f"e2e {model}", lambda: run_e2e(model, device, args.dtype, steps=args.steps,
                                                     backends=args.backends, baseline="diffusers", iters=2, **size))
    if gpu and model != "5b":
        if time.perf_counter() - start < FIVE_B_AFTER_S:
            torch.cuda.empty_cache()
            rows += _guarded("e2e 5b", lambda: run_e2e("5b", device, args.dtype, steps=args.steps, backends=["auto"],
                                                       baseline="diffusers", iters=2, **size))
        else:
            rows.append(_skipped("e2e 5b", f"run already {time.perf_counter() - start:.0f} s old"))
    rows += _guarded("graph tiny", lambda: run_graph("tiny", device, args.dtype, frames=9, height=64, width=96,
                                                     steps=TINY_GRAPH_STEPS))
    if gpu and model != "tiny":
        torch.cuda.empty_cache()
        rows += _guarded(f"graph {model}", lambda: run_graph(model, device, args.dtype, steps=max(args.steps, 2),
                                                             **size))
    if time.perf_counter() - start < FP8_AFTER_S or not gpu:
        if gpu:
            torch.cuda.empty_cache()
        rows += _guarded("fp8", lambda: run_fp8(device))
    else:
        rows.append(_skipped("fp8", f"run already {time.perf_counter() - start:.0f} s old"))
    summary = dict(wall_s=time.perf_counter() - start, model=model, steps=args.steps,
                   headline=_headline(rows))
    return rows, summary, ceil


def _headline(rows: list[Row]) -> dict:
    """The ratios worth quoting: per e2e stage, auto against reference and against diffusers; per
    graph case, the graph's step speed-up, the memory it holds and whether it matched eager."""
    out = {}
    for row in rows:
        if row.suite == "e2e" and row.backend == "auto":
            out[row.case] = {k: v for k, v in row.extra.items() if k.startswith(("speedup", "latents"))}
        if row.suite == "fp8" and "ratio_vs_bf16" in row.extra:
            out[f"{row.case} {row.backend}"] = {"ratio_vs_bf16": row.extra["ratio_vs_bf16"]}
        if row.suite == "graph" and row.backend == "cuda graph" and row.median_ms is not None:
            out[f"{row.case} cuda graph"] = {k: v for k, v in row.extra.items()
                                             if k.startswith(("speedup", "graph", "latents"))}
    return out


def markdown(record: dict) -> str:
    """A short table of one run for benchmarks/results/."""
    env, ceil = record["env"], record["ceilings"]
    lines = [f"# {record['suite']} suite, {env.get('device_name')} ({record['date']})", "",
             f"torch {env['torch']}, CUDA {env.get('cuda')}, driver {env.get('driver')}, triton {env.get('triton')}, "
             f"cvfast {env['cvfast']} at {env.get('git_commit') or 'an uncommitted tree'}.", ""]
    if ceil:
        lines += [f"Measured ceilings: {ceil['matmul_dtype']} matmul {ceil['matmul_tflops']:.0f} TFLOP/s, "
                  f"copy {ceil['copy_gbps']:.0f} GB/s (read + write).", ""]
    lines += ["| suite | case | backend | median ms | TFLOP/s | GB/s | notes |", "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        notes = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["extra"].items()
                          if k.startswith(("speedup", "frac", "latents", "skipped", "error", "passed", "failed",
                                           "host", "graph", "ratio", "output", "weight")))
        num = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['suite']} | {r['case']} | {r['backend']} | {num(r['median_ms'], '.4g')} | "
                     f"{num(r['tflops'], '.3g')} | {num(r['gbps'], '.3g')} | {notes} |")
    return "\n".join(lines) + "\n"
