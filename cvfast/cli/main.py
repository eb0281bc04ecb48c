"""The `cvfast` command line (also `python -m cvfast`)."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import sys
from importlib import metadata
from pathlib import Path

import torch.distributed as dist

from ..api import check_loras, generate, load
from ..video import check_video_path, read_video, save_video, video_paths
from ..checkpoints.convert import convert_sat
from ..core.checks import positive_int
from ..core.errors import CVFastInputError
from ..core.files import check_writable, write_text
from ..core.progress import progress
from ..ops.quantized import PRECISIONS
from ..pipeline.accuracy import compare
from ..serve import follow, require_extra, serve
from . import export
from .report import run

# The calibration run's prompt when none is given: the ratios describe the model and the scheduler far
# more than the prompt (MagCache calibrates once per model).
CALIBRATION_PROMPT = "a red panda eating bamboo in a misty forest, slow camera pan"


class DefaultsShown(argparse.HelpFormatter):
    """--help shows each option's default where it has one its help does not already state."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvfast", description="CogVideoX inference")
    parser.add_argument("--version", action="version", version=f"cvfast {metadata.version('cvfast')}")
    sub = parser.add_subparsers(dest="command", required=True)
    # Every command's parser (export's too, made through `sub`) shows its defaults.
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=DefaultsShown)
    gen = sub.add_parser("generate", help="generate a video from a prompt")
    gen.add_argument(*FLAGS["model"], dest="model", default=None,
                     help="model folder or hub id (e.g. THUDM/CogVideoX-5b); 'tiny': the embedded random-weight model "
                          "(the default, with a notice: its video is noise)")
    gen.add_argument("--prompt", default=None, help="what the video shows (or --prompt-file)")
    gen.add_argument("--prompt-file", "--prompt_file", dest="prompt_file", default=None,
                     help="one prompt per line, one video each (OUT-0.mp4, ...; SAT's 'prompt@@image' lines for "
                          "image-to-video), line k with seed --seed + k")
    gen.add_argument(*FLAGS["out"], dest="out", default="video.mp4",
                     help="output video: .mp4 (H.264), .webm (VP9) or .gif")
    gen.add_argument(*FLAGS["num_videos"], dest="num_videos", type=int, default=1,
                     help="videos per prompt (OUT-0.mp4, ...), video k with seed --seed + k")
    gen.add_argument("--generate_type", "--generate-type", dest="generate_type", choices=["t2v", "i2v", "v2v"],
                     default=None, help="CogVideo cli_demo's mode flag: i2v and v2v take --image_or_video_path")
    gen.add_argument("--image_or_video_path", "--image-or-video-path", dest="image_or_video_path", default=None,
                     help="cli_demo's conditioning file: the image (i2v) or video (v2v)")
    gen.add_argument("--fps", type=int, default=None, help="frames per second of the video written (default: "
                     "the model's: 8 for CogVideoX 1.0, 16 for 1.5)")
    gen.add_argument("--cache", default=None, metavar="SPEC",
                     help="step cache: teacache[:T], fbcache[:T] or magcache:T:RATIOS.json (see calibrate-cache)")
    _add_run_arguments(gen)
    calibrate = _model_command(sub, "calibrate-cache", "measure a model's MagCache ratios (one uncached generation)",
                               "the prompt of the calibration run")
    calibrate.add_argument("--out", required=True, help="the ratios JSON to write (for --cache magcache:T:FILE)")
    _add_run_arguments(calibrate)
    convert = sub.add_parser("convert-sat", help="write a SAT checkpoint directory as a diffusers-layout folder")
    convert.add_argument("sat_dir", help="SAT directory: *.yaml, transformer/latest, transformer/<it>/, vae/3d-vae.pt")
    convert.add_argument("out_dir", help="new folder for the diffusers-layout model (safetensors)")
    _add_sat_arguments(convert)
    check = _model_command(sub, "check-precision", "compare a model at an 8-bit precision with its unquantized self",
                           "the prompt of both runs")
    check.add_argument("--out", default=None, help="also write the report as JSON there")
    _add_run_arguments(check)
    check.set_defaults(precision="fp8", steps=8)  # a short generation: the error compounds over the steps
    server = sub.add_parser("serve", help="serve a warm model: an HTTP job API and a web page "
                                          "(pip install 'cvfast[serve]')")
    server.add_argument(*FLAGS["model"], dest="model", required=True, help="model folder, hub id, or 'tiny'")
    server.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    server.add_argument("--port", type=int, default=8000, help="the port to listen on")
    server.add_argument("--store", default="cvfast-store",
                        help="folder of the jobs' database (SQLite) and their videos; a restart on it resumes")
    server.add_argument("--max-queue", type=int, default=64, help="jobs that may wait; one more gets 429")
    server.add_argument("--token", default=os.environ.get("CVFAST_TOKEN"),
                        help="require 'Authorization: Bearer TOKEN' (default: $CVFAST_TOKEN; unset: no token)")
    server.add_argument("--cache", default=None, metavar="SPEC", help="the jobs' default step cache (see generate)")
    server.add_argument("--parallel", default=None, metavar="cfg=C,ulysses=U",
                        help="under torchrun: rank 0 serves, every rank generates each job")
    _add_load_arguments(server)
    export.add_parser(sub)
    return parser


# The flags of generate()'s arguments: cvfast's name first, then the name CogVideo's inference/cli_demo.py
# gives it (its command lines run unchanged). An error naming a Python argument is reported with the
# flag the user typed (`flag_message`).
FLAGS = {"model": ("--model", "--model_path"), "out": ("--out", "--output_path"),
         "num_videos": ("--num-videos", "--num_videos"),
         "num_frames": ("--frames", "--num_frames"), "num_inference_steps": ("--steps", "--num_inference_steps"),
         "guidance_scale": ("--guidance", "--guidance_scale"), "lora": ("--lora", "--lora_path"),
         "negative_prompt": ("--negative-prompt", "--negative_prompt"), "height": ("--height",),
         "width": ("--width",), "seed": ("--seed",), "dtype": ("--dtype",), "device": ("--device",),
         "backend": ("--backend",), "engine": ("--engine",), "precision": ("--precision",), "fps": ("--fps",),
         "offload": ("--offload",), "cache": ("--cache",), "strength": ("--strength",), "base": ("--base",),
         "image_noise_sigma": ("--image-noise-sigma",), "parallel": ("--parallel",), "prompt": ("--prompt",),
         "compile": ("--compile", "--compile-mode")}


def flag_message(message: str, argv: list[str]) -> str:
    """An error message that begins `name=value is not accepted` for a Python argument with a flag,
    begun instead with the flag as typed in argv: `--frames 10 is not accepted`."""
    name, sep, rest = message.partition("=")
    if not sep or name not in FLAGS:
        return message
    typed = next((flag for flag in FLAGS[name] for token in argv if token == flag or token.startswith(flag + "=")),
                 FLAGS[name][0])
    return f"{typed} {rest}"


def _add_run_arguments(gen: argparse.ArgumentParser) -> None:
    """How to load the model and what to generate: the arguments generate and calibrate-cache share."""
    gen.add_argument(*FLAGS["negative_prompt"], dest="negative_prompt", default=None,
                     help="what it should not show (default: none)")
    gen.add_argument(*FLAGS["num_frames"], dest="frames", type=int, default=None,
                     help="number of frames (default: the model's)")
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
    gen.add_argument(*FLAGS["num_inference_steps"], dest="steps", type=int, default=50, help="denoising steps")
    gen.add_argument(*FLAGS["guidance_scale"], dest="guidance", type=float, default=6.0,
                     help="classifier-free guidance scale (<= 1: none)")
    gen.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX's dynamic CFG schedule")
    gen.add_argument("--seed", type=seed_value, default=None, help="0 to 2**64 - 1 (default: a random one)")
    _add_load_arguments(gen)
    gen.add_argument("--image", default=None, help="image file: image-to-video (needs an I2V model)")
    gen.add_argument("--image-noise-sigma", default=None,
                     help="first-frame noise augmentation of the SAT engine: a number or 'sample' (default off)")
    gen.add_argument("--video", default=None, help="video file: video-to-video (needs a T2V model)")
    gen.add_argument("--strength", type=float, default=0.8, help="video-to-video: how much of the schedule runs")
    gen.add_argument("--fit", default="crop", choices=["crop", "pad", "stretch"],
                     help="an --image or --video of another aspect than the output: its centre, black borders, "
                          "or stretched")
    gen.add_argument("--vae-tiling", default="auto", choices=["auto", "on", "off"])
    gen.add_argument(*FLAGS["lora"], dest="lora", action="append", default=[], metavar="PATH",
                     help="a LoRA merged into the weights (repeatable): diffusers/PEFT .safetensors, or SAT "
                          "matrix_A/matrix_B adapters (a SAT checkpoint directory, its .pt, or a .safetensors)")
    gen.add_argument("--lora-scale", type=float, default=1.0, help="the scale of every --lora")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("--parallel", default=None, metavar="cfg=C,ulysses=U",
                     help="spread one video over the ranks of a torchrun job (torchrun --nproc-per-node C*U -m "
                          "cvfast generate ...): CFG branches on C in {1, 2} ranks, video tokens over U ranks")


def _add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """How to load the model: the flags generate, calibrate-cache, check-precision and serve share."""
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present)")
    parser.add_argument("--backend", default="auto", help="auto, reference, sdpa, triton, flash_attn or tensorrt")
    parser.add_argument("--scheduler", default=None, choices=["ddim", "dpm"],
                        help="the sampler, with the model's scheduler settings (default: the model's)")
    parser.add_argument("--engine", default=None, help="with --backend tensorrt: an engine from `cvfast export tensorrt`")
    parser.add_argument("--allow-fp16", action="store_true",
                        help="run a 5B or 1.5 model in float16 anyway (it overflows there: black frames)")
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS,
                        help="the denoiser's 8-bit parts: fp8 (FP8 linears and 8-bit attention), fp8-linear, "
                             "fp8-attention; bf16: none (default). CUDA 8.9+ in bf16, emulated on the CPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer blocks (compiled once, on the first step)")
    parser.add_argument("--compile-mode", default=None, choices=["default", "max-autotune"],
                        help="torch.compile's mode (implies --compile; default: default)")
    parser.add_argument("--offload", default="none", choices=["none", "model", "sequential"],
                        help="'model': keep components on the CPU, each on the GPU only while it runs; "
                             "'sequential': also the transformer's and T5's blocks one at a time (small GPUs)")
    parser.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"],
                        help="replay each denoising step from a CUDA graph (on: CUDA only; auto: eager until measured)")
    _add_sat_arguments(parser)


def _model_command(sub, name: str, description: str, prompt_help: str) -> argparse.ArgumentParser:
    """A command that runs one model (given as its first argument) on one prompt (by default
    CALIBRATION_PROMPT)."""
    parser = sub.add_parser(name, help=description)
    parser.add_argument("model", help="model folder, hub id, or 'tiny'")
    parser.add_argument("--prompt", default=CALIBRATION_PROMPT, help=prompt_help)
    return parser


def seed_value(text: str) -> int:
    """--seed's type: what torch.Generator.manual_seed takes."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2 ** 64:
        raise argparse.ArgumentTypeError(f"{text} is not an integer from 0 to 2**64 - 1")
    return seed


def _add_sat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=None, help="SAT checkpoints: the diffusers folder or hub id (e.g. "
                        "THUDM/CogVideoX-5b) that supplies the T5 text encoder, tokenizer, scheduler and VAE config")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle SAT checkpoints without the allowlist: this RUNS CODE from the files; "
                             "only for files you trust")


def run_convert_sat(args) -> int:
    print(f"wrote {convert_sat(args.sat_dir, args.out_dir, base=args.base, trust_pickle=args.trust_pickle)}")
    return 0


def read_image(path: str, flag: str):
    """An image file as an RGB PIL image; CVFastInputError naming `flag` when it cannot be read."""
    from PIL import Image
    try:
        return Image.open(path).convert("RGB")
    except OSError as exc:
        raise CVFastInputError(f"{flag} {path!r} cannot be read as an image: {exc}") from None


def _read_inputs(args) -> dict:
    """--image / --video files as generate() arguments."""
    out = {}
    if args.image is not None:
        out["image"] = read_image(args.image, "--image")
    if args.video is not None:
        out["video"] = read_video(args.video, "--video")
        out["strength"] = args.strength
    if args.image_noise_sigma is not None:
        sigma = args.image_noise_sigma
        try:
            out["image_noise_sigma"] = sigma if sigma == "sample" else float(sigma)
        except ValueError:
            raise CVFastInputError(f"--image-noise-sigma {sigma!r}: a number or 'sample'") from None
    return out


def _end_distributed() -> None:
    """Tear down the process group of a parallel run, so the process exits cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def load_arguments(args) -> dict:
    """The flags that say how to load the model, as load() arguments."""
    return dict(device=args.device, dtype=args.dtype, backend=args.backend, allow_fp16=args.allow_fp16,
                offload=args.offload, base=args.base, trust_pickle=args.trust_pickle, engine=args.engine,
                parallel=args.parallel, precision=args.precision, scheduler=args.scheduler,
                compile="max-autotune" if args.compile_mode == "max-autotune" else args.compile or bool(args.compile_mode))


def generate_arguments(args) -> dict:
    """The flags that say what to generate, as Pipeline.generate() arguments."""
    return dict(**_read_inputs(args), negative_prompt=args.negative_prompt, num_frames=args.frames,
                height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                use_dynamic_cfg=args.dynamic_cfg, seed=args.seed, progress=not args.no_progress, fit=args.fit,
                vae_tiling={"auto": "auto", "on": True, "off": False}[args.vae_tiling],
                cuda_graph={"auto": "auto", "on": True, "off": False}[args.cuda_graph])


def cli_demo_condition(args) -> None:
    """cli_demo's --generate_type and --image_or_video_path as --image / --video."""
    path, mode = args.image_or_video_path, args.generate_type
    if path is not None and mode in (None, "t2v"):
        raise CVFastInputError(f"--image_or_video_path {path!r} is not accepted: with --generate_type i2v or v2v")
    if mode in ("i2v", "v2v"):
        flag = "image" if mode == "i2v" else "video"
        given = getattr(args, flag)
        if path is not None and given is not None:
            raise CVFastInputError(f"--image_or_video_path {path!r} is not accepted: --{flag} is given too")
        if path is None and given is None:
            raise CVFastInputError(f"--generate_type {mode} is not accepted: without --image_or_video_path "
                                   f"(or --{flag})")
        setattr(args, flag, given or path)


def run_generate(args) -> int:
    cli_demo_condition(args)
    if (args.prompt is None) == (args.prompt_file is None):
        raise CVFastInputError("--prompt or --prompt-file is needed, one of them: "
                               + ("neither was given" if args.prompt is None else "both were given"))
    videos = positive_int("num_videos", args.num_videos)
    jobs = read_prompt_file(args.prompt_file) if args.prompt_file is not None else None
    if videos > 1:  # each video its own generation and seed, so each sidecar reproduces its video alone
        jobs = [job for job in (jobs or [(args.prompt, None)]) for _ in range(videos)]
    arguments = generate_arguments(args)  # reads --image / --video first: a bad file is the only message
    if args.model is None:
        print("cvfast: note: no --model given: generating with the embedded tiny model, whose weights are random "
              "(its video is noise); pass --model THUDM/CogVideoX-5b or a model folder", file=sys.stderr)
        args.model = "tiny"
    if jobs is not None:
        return run_jobs(args, jobs, arguments)
    result = generate(args.prompt, model=args.model, out=args.out, loras=[(path, args.lora_scale) for path in args.lora],
                      cache=args.cache, fps=args.fps, **load_arguments(args), **arguments)
    _end_distributed()  # only after success: peers of a failed rank may still be inside a collective
    if result is None:  # a parallel job's other ranks: rank 0 wrote the video and reports
        return 0
    report_video(args, Path(args.out), args.prompt, args.image or args.video, result)
    return 0


def read_prompt_file(path: str) -> list[tuple[str, str | None]]:
    """(prompt, image path or None) per line of a prompt file; blank lines are skipped; SAT's
    `prompt@@image` lines name the image of an image-to-video line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CVFastInputError(f"--prompt-file {path!r} cannot be read: {exc}") from None
    jobs = []
    for line in (line.strip() for line in lines):
        if line:
            prompt, _, image = line.partition("@@")
            jobs.append((prompt.strip(), image.strip() or None))
    if not jobs:
        raise CVFastInputError(f"--prompt-file {path!r} is not accepted: it holds no prompt")
    return jobs


def run_jobs(args, jobs: list[tuple[str, str | None]], arguments: dict) -> int:
    """One video per job ((prompt, image path or None): a line of --prompt-file, or one of
    --num-videos), from one loaded model: OUT-0.mp4, OUT-1.mp4, ... each with its sidecar; job k's
    seed is --seed + k (a random base when --seed is not given)."""
    if args.parallel is not None:
        raise CVFastInputError(f"--parallel {args.parallel!r} is not accepted: with --prompt-file or --num-videos "
                               "(run one job per video)")
    paths = video_paths(check_video_path(args.out), len(jobs))
    if args.fps is not None:
        positive_int("fps", args.fps)
    images = {image: read_image(image, "--prompt-file image") for _, image in jobs if image is not None}
    check_loras(args.lora, args.precision)
    pipe = load(args.model, **load_arguments(args))
    for path in args.lora:
        pipe.load_lora(path, args.lora_scale, trust_pickle=args.trust_pickle)
    base = random.randrange(2 ** 63) if args.seed is None else args.seed
    for index, ((prompt, image), path) in enumerate(zip(jobs, paths)):
        condition = {"image": images[image]} if image is not None else {}
        result = pipe.generate(prompt, cache=args.cache, **{**arguments, "seed": (base + index) % 2 ** 64, **condition})
        save_video(result.frames[0], path, fps=args.fps or result.fps)
        report_video(args, path, prompt, image, result)
    return 0


def report_video(args, path: Path, prompt: str, condition: str | None, result) -> None:
    """The lines saying what was written, and its sidecar `<video>.json`: what produced it."""
    videos = result.frames
    fps = args.fps or result.fps
    sidecar = path.with_name(path.name + ".json")
    write_text(sidecar, json.dumps({
        "prompt": prompt, "negative_prompt": args.negative_prompt, "condition": condition, "seed": result.seed,
        "steps": args.steps, "guidance": args.guidance, "dynamic_cfg": args.dynamic_cfg, "model": args.model,
        "precision": args.precision, "cache": args.cache, "frames": videos.shape[1], "height": videos.shape[2],
        "width": videos.shape[3], "fps": fps, "cvfast": metadata.version("cvfast"),
        "timings_s": result.timings}, indent=1) + "\n")
    print(f"wrote {path}: {len(videos)} video{'s' if len(videos) > 1 else ''} of {videos.shape[1]} frames at "
          f"{videos.shape[2]}x{videos.shape[3]}, {fps} fps (seed {result.seed}); what made it: {sidecar}")
    print(", ".join(f"{stage.replace('_', ' ')} {seconds:.2f} s" for stage, seconds in result.timings.items()))
    if result.cache is not None:
        print(f"{result.cache['policy']}: {len(result.cache['computed_steps'])} of "
              f"{len(result.cache['computed_steps']) + len(result.cache['skipped_steps'])} steps computed")
    if result.peak_memory_gib:
        print("peak GPU memory: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} GiB"
                                              for k, v in result.peak_memory_gib.items()))


def run_calibrate(args) -> int:
    check_writable(args.out, "--out")
    check_loras(args.lora, args.precision)
    pipe = load(args.model, **load_arguments(args))
    for path in args.lora:
        pipe.load_lora(path, args.lora_scale, trust_pickle=args.trust_pickle)
    ratios = pipe.calibrate_cache(args.prompt, out=args.out, **generate_arguments(args))
    print(f"wrote {args.out} ({len(ratios)} step ratios; use --cache magcache:0.06:{args.out})")
    return 0


def run_check_precision(args) -> int:
    """Exit status 0 when the verdict passes, 1 when it fails."""
    if args.precision == "bf16":
        raise CVFastInputError("--precision 'bf16' is not accepted by check-precision: fp8, fp8-linear or "
                               "fp8-attention (bf16 is what it compares against)")
    if args.lora:
        raise CVFastInputError(f"--lora {args.lora[0]!r} is not accepted by check-precision: compare a model "
                               "with the LoRA already merged into its weights")
    if args.out is not None:
        check_writable(args.out, "--out")
    arguments = load_arguments(args)
    reference = load(args.model, **{**arguments, "precision": "bf16"})
    candidate = load(args.model, **arguments)
    run_arguments = generate_arguments(args)
    seed, _ = run_arguments.pop("seed"), run_arguments.pop("progress")
    report = compare(reference, candidate, args.prompt, seed=0 if seed is None else seed, **run_arguments)
    print(precision_report(report))
    if args.out is not None:
        write_text(args.out, json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0 if report["passed"] else 1


def precision_report(report: dict) -> str:
    """The comparison as text: weights, the forward per block and at the output, the latents, verdict."""
    mib = 2 ** 20
    weights, limits = report["weights"], report["thresholds"]
    lines = [f"transformer weights: {weights['reference_bytes'] / mib:.1f} MiB unquantized, "
             f"{weights['candidate_bytes'] / mib:.1f} MiB at {report['precision']}",
             "one forward (cosine, relative L2 against unquantized):"]
    lines += [f"  block {i:3d}: {b['cosine']:.6f}  {b['rel_l2']:.4f}" for i, b in enumerate(report["blocks"])]
    lines += [f"  output   : {report['output']['cosine']:.6f}  {report['output']['rel_l2']:.4f}"
              f"  (needs cosine >= {limits['output_cosine']})",
              f"latents moved by {report['steps']} steps: {report['latents']['cosine']:.6f}  "
              f"{report['latents']['rel_l2']:.4f}  (needs cosine >= {limits['latents_cosine']})",
              f"block 0's residual moved by the quantization: {report['first_block_residual_change']:.4f} "
              f"(FirstBlockCache thresholds: keep at least twice this)",
              f"verdict: {'PASS' if report['passed'] else 'FAIL'} ({report['precision']})"]
    return "\n".join(lines)


def with_flags(command, argv: list[str], args) -> int:
    """command(args), its input errors naming the flags as typed (`flag_message`)."""
    try:
        return command(args)
    except CVFastInputError as exc:
        renamed = flag_message(str(exc), argv)
        if renamed == str(exc):
            raise
        raise type(exc)(renamed) from None


def run_serve(args) -> int:
    if not 0 < args.port < 2 ** 16:
        raise CVFastInputError(f"--port {args.port} is not accepted: 1 to 65535")
    positive_int("--max-queue", args.max_queue)
    check_writable(args.store, "--store", directory=True)
    require_extra()
    pipe = load(args.model, **load_arguments(args), cache=args.cache,
                cuda_graph={"auto": "auto", "on": True, "off": False}[args.cuda_graph])
    if pipe.parallel is not None and pipe.parallel.rank != 0:
        follow(pipe)  # until rank 0's server stops
    else:
        print(f"cvfast: serving {pipe.name} on http://{args.host}:{args.port} (store {args.store}"
              f"{', token required' if args.token else ''})", file=sys.stderr, flush=True)
        serve(pipe, args.store, host=args.host, port=args.port, max_queue=args.max_queue, token=args.token)
    _end_distributed()
    return 0


COMMANDS = {"generate": run_generate, "calibrate-cache": run_calibrate, "convert-sat": run_convert_sat,
            "check-precision": run_check_precision, "serve": run_serve, "export": export.run}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["generate", *argv]  # cli_demo's command lines have no command: they generate
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(LineFormatter())
    logger = logging.getLogger("cvfast")
    logger.addHandler(handler)
    # Loading and decoding say what they do (cvfast.core.progress), unless --no-progress.
    progress.setLevel(logging.WARNING if getattr(args, "no_progress", False) else logging.INFO)
    try:
        return run(functools.partial(with_flags, COMMANDS[args.command], argv), args)
    finally:  # main() called twice in one process (tests, notebooks) prints each line once
        logger.removeHandler(handler)
        progress.setLevel(logging.NOTSET)


class LineFormatter(logging.Formatter):
    """`cvfast: <message>` for progress lines, `cvfast: WARNING: <message>` for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"cvfast: {text}" if record.levelno == logging.INFO else f"cvfast: {record.levelname}: {text}"
