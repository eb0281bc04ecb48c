"""`cvfast export onnx ...` and `cvfast export tensorrt ...`."""
from __future__ import annotations

import sys

from ..errors import CVFastInputError

TENSORRT_MISSING = (
    "TensorRT is not installed (the Python package `tensorrt` cannot be imported). Install it on a machine "
    "with an NVIDIA GPU and CUDA: `pip install tensorrt` (it must match the CUDA/driver of that machine). "
    "The ONNX export does not need it: `cvfast export onnx --model M --out DIR` works here, and the engine "
    "can be built from that file later (see the README.txt that --serving-repo writes).")
def add_parser(sub) -> None:
    """Add `export` (with `onnx` and `tensorrt`) to the `cvfast` subcommands."""
    exp = sub.add_parser("export", help="export the transformer for serving (ONNX, TensorRT)")
    formats = exp.add_subparsers(dest="format", required=True)
    for fmt, text in (("onnx", "write transformer.onnx (dynamic batch) and optionally check it"),
                      ("tensorrt", "build a TensorRT engine (needs TensorRT)")):
        p = formats.add_parser(fmt, help=text)
        p.add_argument("--model", default="tiny", help="model folder, hub id, or 'tiny' (default)")
        p.add_argument("--out", required=True, help="output directory (transformer.onnx goes there)")
        p.add_argument("--frames", type=int, default=None, help="number of video frames (default: the model's)")
        p.add_argument("--height", type=int, default=None, help="height in pixels (default: the model's)")
        p.add_argument("--width", type=int, default=None, help="width in pixels (default: the model's)")
        p.add_argument("--batch", type=int, default=1, help="batch the engine is tuned for (the ONNX batch is dynamic)")
        p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default float32)")
        p.add_argument("--text-len", type=int, default=None, help="text tokens (default: the model's, 226)")
        p.add_argument("--allow-untrained-size", action="store_true", help="as generate(): 1.5-I2V sizes")
        p.add_argument("--allow-fp16", action="store_true")
        p.add_argument("--check", action="store_true",
                       help="run the ONNX model under onnxruntime at batch 1 and 2 against the reference forward, "
                            "and list operators TensorRT does not support")
        p.add_argument("--serving-repo", default=None, help="also write a Triton model repository there")
        if fmt == "tensorrt":
            p.add_argument("--size", action="append", default=[], metavar="F,H,W",
                           help="a video size (frames,height,width in pixels) to build an engine for; repeat for "
                                "more (default: --frames/--height/--width)")
            p.add_argument("--workspace-gib", type=float, default=None, help="TensorRT's workspace limit")


def _tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _sizes(args, defaults: dict) -> list[tuple[int, int, int]]:
    if not args.size:
        return [(args.frames or defaults["num_frames"], args.height or defaults["height"],
                 args.width or defaults["width"])]
    sizes = []
    for text in args.size:
        parts = text.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise CVFastInputError(f"--size={text!r} is not accepted: frames,height,width in pixels, e.g. 49,480,720")
        sizes.append(tuple(int(p) for p in parts))
    return sizes


def _run_tensorrt(args) -> int:
    if not _tensorrt_available():
        print(f"cvfast: error: {TENSORRT_MISSING}", file=sys.stderr)
        return 2
    from .. import load
    from .tensorrt_engine import build_engines
    try:
        pipe = load(args.model, device="cpu", dtype=args.dtype, backend="reference", allow_fp16=args.allow_fp16)
        plans = build_engines(pipe, args.out, _sizes(args, pipe.defaults), batch=args.batch, dtype=pipe.dtype
                              if args.dtype else None, text_len=args.text_len, workspace_gib=args.workspace_gib,
                              allow_untrained_size=args.allow_untrained_size)
    except (CVFastInputError, ImportError) as exc:
        print(f"cvfast: error: {exc}", file=sys.stderr)
        return 2
    for plan in plans:
        print(f"wrote {plan} (+ {plan.name}.json)")
    return 0


def run(args) -> int:
    if args.format == "tensorrt":
        return _run_tensorrt(args)
    from .. import load
    from . import check_onnx, export_onnx, write_serving_repo
    from .onnx_export import require_onnx
    try:
        require_onnx()
        pipe = load(args.model, device="cpu", dtype=args.dtype, backend="reference", allow_fp16=args.allow_fp16)
        d = pipe.defaults
        path = export_onnx(pipe, args.out, frames=args.frames if args.frames is not None else d["num_frames"],
                           height=args.height if args.height is not None else d["height"],
                           width=args.width if args.width is not None else d["width"], batch=args.batch,
                           text_len=args.text_len, allow_untrained_size=args.allow_untrained_size)
    except (CVFastInputError, ImportError) as exc:
        print(f"cvfast: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}" + (" (+ transformer.onnx.data)" if path.with_name(path.name + ".data").exists() else ""))
    status = 0
    if args.check:
        from .validate import ONNXCheckError
        try:
            result = check_onnx(pipe, path)
        except ONNXCheckError as exc:
            print(f"cvfast: check failed: {exc}", file=sys.stderr)
            return 1
        for batch, s in result["batches"].items():
            print(f"check batch {batch}: relative L2 {s['rel_l2']:.3g}, max abs {s['max_abs']:.3g}, "
                  f"cosine {s['cosine']:.8f} (bound {result['bound']:g}, {result['dtype']}, {result['mode']})")
        if result["unsupported_ops"]:
            print(f"cvfast: check failed: operators TensorRT's ONNX parser does not support: "
                  f"{', '.join(result['unsupported_ops'])}", file=sys.stderr)
            status = 1
        else:
            print("check TensorRT operators: all supported")
    if args.serving_repo is not None:
        print(f"wrote {write_serving_repo(path, args.serving_repo)}")
    return status
