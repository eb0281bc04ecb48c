"""The `cvfast` command line (also `python -m cvfast`)."""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import CVFastInputError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvfast", description="CogVideoX inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a video from a prompt")
    gen.add_argument("--model", default="tiny", help="model folder, hub id, or 'tiny' (default)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--out", default="video.mp4", help="output .mp4 path")
    gen.add_argument("--frames", type=int, default=None, help="number of frames (default: the model's)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance", type=float, default=6.0)
    gen.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX's dynamic CFG schedule")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU)")
    gen.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present)")
    gen.add_argument("--backend", default="auto", help="auto, reference or sdpa")
    gen.add_argument("--allow-fp16", action="store_true")
    gen.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("cvfast: %(levelname)s: %(message)s"))
    logging.getLogger("cvfast").addHandler(handler)
    from . import generate
    try:
        result = generate(args.prompt, model=args.model, out=args.out, device=args.device, dtype=args.dtype,
                          backend=args.backend, allow_fp16=args.allow_fp16, negative_prompt=args.negative_prompt,
                          num_frames=args.frames, height=args.height, width=args.width,
                          num_inference_steps=args.steps, guidance_scale=args.guidance,
                          use_dynamic_cfg=args.dynamic_cfg, seed=args.seed, progress=not args.no_progress)
    except CVFastInputError as exc:
        print(f"cvfast: error: {exc}", file=sys.stderr)
        return 2
    t = result.timings
    print(f"wrote {args.out} (seed {result.seed})")
    print(f"text encoding {t['text_encoding']:.2f} s, denoising {t['denoising']:.2f} s, "
          f"decoding {t['decoding']:.2f} s")
    return 0
