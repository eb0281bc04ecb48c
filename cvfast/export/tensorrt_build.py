"""TensorRT engines of the denoiser, built from cvfast's ONNX export (they run through
`cvfast.runtime.tensorrt`, inside the normal sampler).

`build_engines(pipe, out_dir, sizes=[(frames, height, width), ...])` exports one ONNX graph per size
(the positional tables are baked in, so a graph serves one video size) and builds one strongly
typed engine from each, with an optimisation profile over the batch (1 up to 2 x `batch`, the CFG
batch) and one timing cache shared by all builds. Next to each `<name>.plan` it writes
`<name>.plan.json` (`engine_spec`), which `cvfast.load(..., backend="tensorrt", engine=PATH)` reads
to refuse an engine built for another model, precision or size.

Strongly typed networks take the precision the ONNX graph carries, so the graph is exported in the
engine's dtype: bf16 (every model), fp16 (2B only: 5B and 1.5 overflow in fp16) or fp32. fp8 later.

Not yet run anywhere: TensorRT cannot be installed on the machines this was written on (no GPU);
tests/test_cuda.py builds and checks an engine where TensorRT is present.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import bad_arg
from ..core.files import write_bytes, write_text
from ..runtime.tensorrt import DTYPE_NAMES, ENGINE_FORMAT, config_hash, require_tensorrt
from .onnx import export_onnx, export_shapes


def engine_spec(pipe, frames: int, height: int, width: int, batch: int, dtype: torch.dtype, text_len: int,
                tensorrt_version: str) -> dict:
    shapes = export_shapes(pipe, frames, height, width, text_len)
    return {"format": ENGINE_FORMAT, "variant": pipe.config.variant, "config_hash": config_hash(pipe.config),
            "model": str(pipe.name), "frames": frames, "height": height, "width": width,
            "latent": list(shapes["hidden_states"]), "text_len": text_len, "dtype": DTYPE_NAMES[dtype],
            "batch": [1, 2 * batch], "tensorrt": tensorrt_version}


def build_plan(trt, onnx_path: Path, batch_range: tuple[int, int], cache_path: Path,
               workspace_gib: float | None) -> bytes:
    """The serialized engine of `onnx_path` (the shared timing cache updated)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads transformer.onnx.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2 ** 30))
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    low, high = batch_range
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]  # every input is (batch, ...) with only the batch dynamic
        profile.set_shape(tensor.name, (low, *rest), (high, *rest), (high, *rest))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def build_engines(pipe, out_dir, sizes: list[tuple[int, int, int]], *, batch: int = 1, dtype=None,
                  text_len: int | None = None, workspace_gib: float | None = None,
                  allow_untrained_size: bool = False) -> list[Path]:
    """One engine per (frames, height, width) in `sizes` (pixels, as generate() takes them), in
    `out_dir/<frames>x<height>x<width>.plan`, with `timing.cache` shared across builds and runs.
    dtype: default bf16 (fp16 only for 2B). Returns the engine paths."""
    trt = require_tensorrt()
    if not sizes:
        raise bad_arg("sizes", sizes, "at least one (frames, height, width)")
    dt = torch.bfloat16 if dtype is None else dtype
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = out_dir / "timing.cache"
    plans = []
    for frames, height, width in sizes:
        name = f"{frames}x{height}x{width}"
        onnx_path = export_onnx(pipe, out_dir / f"onnx-{name}", frames=frames, height=height, width=width,
                                batch=batch, dtype=dt, text_len=text_len, allow_untrained_size=allow_untrained_size)
        plan_path = out_dir / f"{name}.plan"
        spec = engine_spec(pipe, frames, height, width, batch, dt, text_len or pipe.config.max_text_seq_length,
                           trt.__version__)
        plan = build_plan(trt, onnx_path, tuple(spec["batch"]), cache_path, workspace_gib)
        # The spec records the plan's size, so that a plan and spec from different builds (a run
        # killed between the two renames) are refused at load instead of trusted.
        write_bytes(plan_path, plan)
        write_text(plan_path.with_name(plan_path.name + ".json"), json.dumps(dict(spec, plan_bytes=len(plan)), indent=1))
        plans.append(plan_path)
    return plans


