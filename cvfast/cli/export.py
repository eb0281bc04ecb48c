"""`cvfast export onnx ...` and `cvfast export tensorrt ...`."""
from __future__ import annotations

from ..api import load
from ..core.errors import CVFastInputError
from ..core.files import check_writable
from ..export import build_engines, check_onnx, export_onnx, write_serving_repo
from ..export.onnx import check_export_dir, require_onnx
from ..runtime.tensorrt import require_tensorrt
from .report import error


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




def requested_sizes(args, defaults: dict) -> list[tuple[int, int, int]]:
    """The --size values (frames,height,width), else --frames/--height/--width or the model's defaults."""
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


def load_reference(args):
    """The model to export, on the CPU with the reference ops (the exported graph never holds a kernel),
    once the optional ONNX packages are known to be there (one missing is an input error, status 2)."""
    try:
        require_onnx()
    except ImportError as exc:
        raise CVFastInputError(str(exc)) from None
    return load(args.model, device="cpu", dtype=args.dtype, backend="reference", allow_fp16=args.allow_fp16)


def run_tensorrt(args) -> int:
    require_tensorrt()
    check_writable(args.out, "--out", directory=True)
    pipe = load_reference(args)
    plans = build_engines(pipe, args.out, requested_sizes(args, pipe.defaults), batch=args.batch,
                          dtype=pipe.dtype if args.dtype else None, text_len=args.text_len,
                          workspace_gib=args.workspace_gib, allow_untrained_size=args.allow_untrained_size)
    for plan in plans:
        print(f"wrote {plan} (+ {plan.name}.json)")
    return 0


def run_onnx(args) -> int:
    check_export_dir(args.out)
    pipe = load_reference(args)
    d = pipe.defaults
    path = export_onnx(pipe, args.out, frames=args.frames if args.frames is not None else d["num_frames"],
                       height=args.height if args.height is not None else d["height"],
                       width=args.width if args.width is not None else d["width"], batch=args.batch,
                       text_len=args.text_len, allow_untrained_size=args.allow_untrained_size)
    print(f"wrote {path}" + (" (+ transformer.onnx.data)" if path.with_name(path.name + ".data").exists() else ""))
    status = 0
    if args.check:
        result = check_onnx(pipe, path)  # ONNXCheckError: the one error printer, status 1
        for batch, s in result["batches"].items():
            print(f"check batch {batch}: relative L2 {s['rel_l2']:.3g}, max abs {s['max_abs']:.3g}, "
                  f"cosine {s['cosine']:.8f} (bound {result['bound']:g}, {result['dtype']}, {result['mode']})")
        if result["unsupported_ops"]:
            error(f"check failed: operators TensorRT's ONNX parser does not support: "
                  f"{', '.join(result['unsupported_ops'])}")
            status = 1
        else:
            print("check TensorRT operators: all supported")
    if args.serving_repo is not None:
        print(f"wrote {write_serving_repo(path, args.serving_repo)}")
    return status


def run(args) -> int:
    return run_tensorrt(args) if args.format == "tensorrt" else run_onnx(args)
