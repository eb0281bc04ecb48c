"""The front door: `load()` a model into a Pipeline, `generate()` in one call, `save_video()`."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .build import build
from .checkpoints import Checkpoint, open_checkpoint
from .checkpoints.lora import is_lora_hub_id
from .core.checks import check_fp16, positive_int, resolve_device, resolve_dtype
from .core.errors import CVFastInputError, bad_arg
from .core.progress import progress
from .models.config import TransformerConfig
from .ops import resolve
from .ops.quantized import check_precision, quantized
from .pipeline import GenerationResult, Pipeline
from .runtime import Offload, Runtime
from .runtime import parallel as par
from .runtime.compile import check_compile
from .runtime.tensorrt import TensorRTTransformer, check_model, read_spec, require_tensorrt
from .sampler import cache as step_cache
from .sampler import graph
from .sampler.schedulers import SCHEDULER_KINDS
from .video import check_video_path, save_video, video_paths


def load(model: str | Path, *, device=None, dtype=None, backend: str = "auto", allow_fp16: bool = False,
         offload: str = "none", cuda_graph: bool | str = "auto", base=None, trust_pickle: bool = False,
         parallel=None, engine=None, cache=None, precision: str = "bf16", torch_dtype=None,
         scheduler: str | None = None, compile: bool | str = False) -> Pipeline:
    """Load a CogVideoX pipeline.

    model: a diffusers-layout folder, a hub id such as "THUDM/CogVideoX-5b", "tiny" (an embedded,
    seeded random-weight model of the real architecture; its video is noise), or a diffusers
    CogVideoX pipeline object in memory (`from_diffusers`). device: default CUDA
    when present, else CPU. dtype (or diffusers' torch_dtype): default bf16 on CUDA, fp32 on CPU. backend: "auto", "reference",
    "sdpa", "triton" or "flash_attn" (see `cvfast.ops.resolve`). offload: "none", "model" to keep
    the components on the CPU and bring each to the device only while it runs (text encoder,
    transformer, VAE), or "sequential": also the transformer's and T5's blocks one at a time (see
    `cvfast/runtime/offload.py`). cuda_graph: generate()'s default: False, True (replay each denoising step
    from a CUDA graph captured per shape; CUDA only, without offload) or "auto" (see
    `cvfast/sampler/graph.py`). A SAT checkpoint directory (see `cvfast/checkpoints/sat.py`) also loads; base:
    the diffusers folder or hub id its text encoder, tokenizer and scheduler come from;
    trust_pickle=True unpickles its checkpoints without the allowlist, which runs code from the files.
    parallel: None, or e.g. "cfg=2,ulysses=2" (or a `cvfast.ParallelConfig`) in a program
    started by torchrun on cfg * ulysses ranks (see `cvfast/runtime/parallel/`); a CUDA device without an
    index becomes this rank's GPU (LOCAL_RANK). Checked before the weights load.
    backend="tensorrt" with engine=PATH (from `cvfast export tensorrt`): the denoiser runs from that
    engine (CUDA; its dtype is the engine's), the rest with "auto"; the transformer's weights are not
    loaded. An engine built for another model, size or precision is refused, naming which.
    cache: generate()'s default step cache (None: none; see `Pipeline.generate`), checked here.
    scheduler: None (the model's), "ddim" or "dpm": CogVideoX's DDIM or DPM sampler with the model's
    scheduler settings (what CogVideo's cli_demo swaps in with `from_config`).
    precision: "bf16" (the denoiser unquantized, in `dtype`), "fp8" (FP8 linears and 8-bit attention),
    "fp8-linear" or "fp8-attention" (one of the two; see `cvfast/ops/quantized.py`). FP8 runs on CUDA
    devices of compute capability 8.9 or more in bf16, and emulated (the same roundings, fp32 matmuls)
    on the CPU; `pipe.backends()` names the quantized ops' backends. FP8 linears take no LoRA.
    compile: False, True or "max-autotune": torch.compile each transformer block (regional
    compilation, compiled once on the first call with a new shape and reused by every block; see
    `cvfast/runtime/compile.py`). Not with backend="tensorrt" or parallel=.
    """
    if scheduler not in (None, *SCHEDULER_KINDS.values()):
        raise bad_arg("scheduler", scheduler, f"None (the model's) or one of {sorted(set(SCHEDULER_KINDS.values()))}")
    if torch_dtype is not None:  # diffusers' name for it
        if dtype is not None and dtype != torch_dtype:
            raise bad_arg("torch_dtype", torch_dtype, f"None or the same as dtype={dtype} (they name one setting)")
        dtype = torch_dtype
    config = par.parse(parallel)
    if config is not None:
        par.check_launch(config, offload, cuda_graph)
        config = config if config.world_size > 1 else None  # cfg=1,ulysses=1: a single process
    dev = resolve_device(device)
    compile = check_compile(compile, engine=backend == "tensorrt" or engine is not None, parallel=config is not None,
                            offload=offload)
    if backend == "tensorrt" or engine is not None:
        if config is not None:
            raise bad_arg("parallel", parallel, "None with backend='tensorrt' (an engine runs on one GPU)")
        if cache is not None:
            raise bad_arg("cache", cache, "None with backend='tensorrt': the engine runs the whole transformer and "
                          "does not expose its blocks' residual")
        if precision != "bf16":
            raise bad_arg("precision", precision, "'bf16' with backend='tensorrt' (the engine fixes its own precision)")
        return load_with_engine(model, engine, backend, dev, dtype, allow_fp16, offload, cuda_graph, base, scheduler)
    dev = par.rank_device(dev) if config is not None else dev
    dt = resolve_dtype(dtype, dev)
    check_precision(precision, dev, dt)
    ops = quantized(resolve(backend, dev), precision, dev)
    placement = Offload(offload, dev)
    graph.check_setting(cuda_graph, dev, offload)

    def check(cfg: TransformerConfig) -> None:
        # The embedded tiny model is exempt from the fp16 policy: its output is noise in any dtype.
        check_fp16(dt, cfg.variant, allow_fp16 or (isinstance(model, (str, Path)) and str(model) == "tiny"))
        if config is not None:
            par.check_model(config, cfg)
        step_cache.parse(cache, cfg.variant)
    start = time.perf_counter()
    checkpoint = with_scheduler(open_checkpoint(model, check, base=base, trust_pickle=trust_pickle), scheduler)
    progress.info("loading %s (%s) on %s in %s ...", checkpoint.name, checkpoint.transformer.variant, dev,
                  str(dt).replace("torch.", ""))
    context = par.ParallelContext(config, dev) if config is not None else None
    pipe = build(checkpoint, Runtime(dev, dt, placement, cuda_graph, context, cache, precision, compile), ops)
    progress.info("loaded %s in %.1f s", checkpoint.name, time.perf_counter() - start)
    return pipe


def from_diffusers(pipeline, **load_options) -> Pipeline:
    """A cvfast pipeline from a diffusers CogVideoX pipeline in memory (text-, image- or video-to-video),
    as it is now: its configs, weights, tokenizer, text encoder and scheduler (a swapped scheduler and
    edited weights included), without writing a folder. load_options: as `load` takes them (device,
    dtype or torch_dtype, backend, offload, cuda_graph, cache, precision, compile, scheduler, ...).
    The transformer and VAE weights are copied; the T5 encoder is shared when it already is where and
    in the dtype cvfast keeps it (see `cvfast/checkpoints/in_memory.py`)."""
    return load(pipeline, **load_options)


def with_scheduler(checkpoint: Checkpoint, scheduler: str | None) -> Checkpoint:
    """The checkpoint with its scheduler's kind replaced (None: as it is); the other settings stay."""
    if scheduler is None:
        return checkpoint
    return dataclasses.replace(checkpoint, scheduler=dataclasses.replace(checkpoint.scheduler, kind=scheduler))


def load_with_engine(model, engine, backend: str, dev, dtype, allow_fp16: bool, offload: str, cuda_graph,
                     base, scheduler: str | None) -> Pipeline:
    """load(backend="tensorrt", engine=PATH): every check before anything heavy; the VAE and text
    encoder load as usual, the transformer's weights are not read."""
    if backend != "tensorrt":
        raise bad_arg("engine", str(engine), f"None with backend={backend!r} (an engine needs backend='tensorrt')")
    if engine is None:
        raise bad_arg("engine", None, "the path of an engine from `cvfast export tensorrt` with backend='tensorrt'")
    spec = read_spec(engine)
    if dev.type != "cuda":
        raise bad_arg("device", str(dev), "a CUDA device for backend='tensorrt'")
    dt = resolve_dtype(dtype if dtype is not None else spec["dtype"], dev)
    if offload != "none":
        raise bad_arg("offload", offload, "'none' with backend='tensorrt' (the engine holds the transformer)")
    if cuda_graph is True:
        raise bad_arg("cuda_graph", cuda_graph, "False or 'auto' with backend='tensorrt' (capturing an engine's "
                      "execution is not supported yet)")
    if base is not None:
        raise bad_arg("base", base, "None with backend='tensorrt' (convert a SAT checkpoint first: cvfast convert-sat)")
    require_tensorrt()

    def check(cfg: TransformerConfig) -> None:
        check_fp16(dt, cfg.variant, allow_fp16)
        check_model(spec, cfg, dt, engine)
    checkpoint = with_scheduler(open_checkpoint(model, check, transformer_weights=False), scheduler)
    runtime = Runtime(dev, dt, Offload("none", dev), cuda_graph)
    return build(checkpoint, runtime, resolve("auto", dev), TensorRTTransformer(engine, spec, checkpoint.transformer, dev))


def check_loras(paths, precision: str) -> None:
    """LoRAs named before a load: each must exist (or be a hub id, fetched when merged), and FP8
    weights take none."""
    for path in paths:
        if not Path(path).expanduser().exists() and not is_lora_hub_id(path):
            raise bad_arg("lora", str(path), "an existing LoRA file or folder, a hub id 'org/name', or a SAT "
                          "checkpoint directory")
        if precision in ("fp8", "fp8-linear"):
            raise bad_arg("lora", str(path), f"no LoRA with precision={precision!r} (FP8 weights take none)")


def generate(prompt, *, model: str | Path = "tiny", out: str | Path | None = "video.mp4", device=None, dtype=None,
             backend: str = "auto", allow_fp16: bool = False, offload: str = "none", loras=(),
             base=None, trust_pickle: bool = False, parallel=None, engine=None, precision: str = "bf16",
             fps: int | None = None, scheduler: str | None = None, compile: bool | str = False,
             **kwargs) -> GenerationResult | None:
    """One call: load `model`, generate for `prompt` (keyword arguments as `Pipeline.generate`) and,
    when `out` is not None, write the video there (.mp4, .webm or .gif; several prompts: one file each,
    `video_paths(out, n)`: v-0.mp4, v-1.mp4, ...) at `fps` frames per second (default the model's).
    `out`, `fps` and the LoRA files are checked before the model loads. parallel: as in `load`; then rank 0 writes the videos and returns the result, the
    other ranks return None. compile: as in `load`."""
    if fps is not None:
        positive_int("fps", fps)
    if out is not None:
        check_video_path(out)
        if kwargs.get("output_type", "np") == "latent":
            raise CVFastInputError("output_type='latent' is not accepted with out=...: latents are not a video")
    check_loras([path for path, _ in loras], precision)
    pipe = load(model, device=device, dtype=dtype, backend=backend, allow_fp16=allow_fp16, offload=offload,
                base=base, trust_pickle=trust_pickle, parallel=parallel, engine=engine, precision=precision,
                scheduler=scheduler, compile=compile)
    for path, scale in loras:  # (path, scale) pairs merged into the transformer before generating
        pipe.load_lora(path, scale, trust_pickle=trust_pickle)
    result = pipe.generate(prompt, **kwargs)
    if out is not None and result is not None:
        for frames, path in zip(result.frames, video_paths(out, len(result.frames))):
            save_video(frames, path, fps=fps or result.fps)
    return result
