"""cvfast's benchmarks: `python benchmarks/run.py [--suite NAME] ...` prints a table and writes JSON.

Suites:
  default   (no arguments) the tiny model end to end plus small op cases: under a minute on a laptop CPU
  ops       each accelerated op and backend at CogVideoX sizes, against the device's measured ceilings
  e2e       text encoding, one step, the loop and the decode per backend; --baseline diffusers adds
            diffusers' pipeline with the same weights, measured in the same run; --parallel cfg=C,ulysses=U
            (under `torchrun --nproc-per-node C*U`) one rank against the job, in the same run
  roofline  FLOPs, bytes and time floors of a full forward, computed on meta tensors (runs nothing)
  gpu       the one command to run when a GPU is lent (see README, "Benchmarks"), within --budget-s
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Row, ceilings, environment, format_table, markdown  # noqa: E402
from benchmarks.models import MODELS  # noqa: E402
from benchmarks.suite_gpu import BUDGET_S, PARTS  # noqa: E402
from cvfast.core.files import write_text  # noqa: E402

SUITES = ("default", "ops", "e2e", "roofline", "gpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="default", choices=SUITES)
    p.add_argument("--model", default=None, choices=MODELS,
                   help="default: tiny for default/e2e on a CPU, 5b for the gpu suite and roofline")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps of the e2e loop")
    p.add_argument("--backends", default="reference,auto", help="comma-separated cvfast backends")
    p.add_argument("--baseline", default=None, choices=["diffusers"])
    p.add_argument("--device", default=None, help="default: cuda when present")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--roofline-device", default="h100-sxm", help="a key of benchmarks/devices.json")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/latest-<suite>.json)")
    p.add_argument("--profile", default=None, metavar="TRACE.json",
                   help="default/e2e: also write a torch.profiler trace (Chrome format) of one denoising step of the "
                        "first backend")
    p.add_argument("--budget-s", type=float, default=None,
                   help="gpu suite: seconds its parts may take (default %d)" % BUDGET_S)
    p.add_argument("--parts", default=",".join(PARTS),
                   help="gpu suite: the parts to run, comma-separated, among %s (default: all)" % ",".join(PARTS))
    p.add_argument("--parallel", default=None, metavar="cfg=C,ulysses=U",
                   help="e2e only, under torchrun: the first backend on one rank and on the whole job")
    p.add_argument("--cache", default=None, metavar="SPEC",
                   help="default/e2e: also the first backend's loop with this step cache (e.g. teacache:0.2)")
    args = p.parse_args(argv)
    for name in ("frames", "height", "width", "steps", "budget_s"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name}={value}: must be >= 1")
    args.backends = [b for b in args.backends.split(",") if b]
    args.parts = [part for part in args.parts.split(",") if part]
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown or not args.parts:
        p.error(f"--parts={','.join(args.parts)}: expected some of {','.join(PARTS)}")
    if tuple(args.parts) != PARTS and args.suite != "gpu":
        p.error("--parts: only with --suite gpu")
    from cvfast.ops import BACKEND_CHOICES
    bad = [b for b in args.backends if b not in BACKEND_CHOICES]
    if bad:
        p.error(f"--backends: {bad} not among {BACKEND_CHOICES}")
    if args.parallel is not None and (args.suite != "e2e" or args.baseline is not None):
        p.error("--parallel: only with --suite e2e and without --baseline")
    if args.profile is not None and args.suite not in ("default", "e2e"):
        p.error("--profile: only with --suite e2e or default")
    if args.cache is not None and (args.suite not in ("default", "e2e") or args.parallel is not None):
        p.error("--cache: only with --suite e2e or default, without --parallel")
    return args


def defaults_for(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the sizes: the tiny model's own on a CPU, CogVideoX's 49x480x720 for real models."""
    model = args.model or {"gpu": "5b", "roofline": "5b"}.get(args.suite, "tiny")
    real = model != "tiny"
    args.model = model
    args.frames = args.frames or (49 if real else 9)
    args.height = args.height or (480 if real else 64)
    args.width = args.width or (720 if real else 96)
    args.steps = args.steps or (10 if args.suite == "gpu" else 50 if real else 10)
    args.budget_s = args.budget_s or BUDGET_S
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return args


def run_suite(args: argparse.Namespace, device: torch.device, save) -> tuple[list[Row], dict, dict]:
    """Rows, summary, ceilings of one suite; the gpu suite also `save`s them after each part."""
    if args.suite == "roofline":
        from benchmarks.suite_roofline import roofline
        rows, summary = roofline(args.model, args.frames, args.height, args.width, steps=args.steps,
                                 device_key=args.roofline_device)
        return rows, summary, {}
    if args.suite == "gpu":
        from benchmarks.suite_gpu import run_gpu
        return run_gpu(args, device, save)
    ceil = ceilings(device, args.dtype)
    rows = []
    if args.suite in ("default", "ops"):
        from benchmarks.suite_ops import run_ops
        rows += run_ops(args.model, device, args.dtype, ceil, frames=args.frames, height=args.height,
                        width=args.width, backends=None)
    if args.parallel is not None:
        from benchmarks.suite_e2e import run_e2e_parallel
        rows += run_e2e_parallel(args.model, device, args.dtype, frames=args.frames, height=args.height,
                                 width=args.width, steps=args.steps, backend=args.backends[0], parallel=args.parallel)
    elif args.suite in ("default", "e2e"):
        from benchmarks.suite_e2e import run_e2e
        rows += run_e2e(args.model, device, args.dtype, frames=args.frames, height=args.height, width=args.width,
                        steps=args.steps, backends=args.backends, baseline=args.baseline, cache=args.cache)
    return rows, {}, ceil


def write_record(out: Path, args: argparse.Namespace, device: torch.device, rows: list[Row], summary: dict,
                 ceil: dict) -> dict:
    """The run's JSON at `out` and its markdown beside it, each written whole."""
    record = dict(suite=args.suite, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  args={k: str(v) if isinstance(v, torch.dtype) else v for k, v in vars(args).items()},
                  env=environment(device), ceilings=ceil, summary=summary, rows=[r.as_dict() for r in rows])
    write_text(out, json.dumps(record, indent=1, default=str))
    write_text(out.with_suffix(".md"), markdown(json.loads(out.read_text())))
    return record


def draw(out: Path) -> list[Path]:
    """The run's plots beside its JSON (`<name>-<kind>.png`), when matplotlib is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plots (python benchmarks/plot.py draws them later)")
        return []
    from benchmarks.plot import plot_record
    return plot_record(json.loads(out.read_text()), out.parent, out.stem)


def main(argv=None) -> Path | None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    if args.parallel is not None:
        device = _start_distributed(device)
    args = defaults_for(args, device)
    out = Path(args.json or Path(__file__).parent / "results" / f"latest-{args.suite}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, summary, ceil = run_suite(args, device, lambda *part: write_record(out, args, device, *part))
    if args.parallel is not None and torch.distributed.get_rank() != 0:
        return None  # rank 0 reports
    record = write_record(out, args, device, rows, summary, ceil)
    for png in draw(out):
        print(f"wrote {png}")
    if args.profile is not None:
        from benchmarks.suite_e2e import write_trace
        trace = write_trace(args.model, device, args.dtype, args.backends[0], args.profile, frames=args.frames,
                            height=args.height, width=args.width)
        print(f"wrote {trace}")
    if ceil:
        print(f"ceilings on {record['env']['device_name']}: {ceil['matmul_dtype']} matmul "
              f"{ceil['matmul_tflops']:.3g} TFLOP/s, "
              f"copy {ceil['copy_gbps']:.1f} GB/s")
    print(format_table(rows))
    if summary:
        print(json.dumps(summary, indent=1, default=str))
    print(f"wrote {out}")
    return out


def _start_distributed(device: torch.device) -> torch.device:
    """--parallel: this rank's device, and torch.distributed started from torchrun's environment."""
    from cvfast.runtime.parallel import rank_device
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


if __name__ == "__main__":
    main()
