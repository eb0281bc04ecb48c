"""TensorRT engines of the denoiser: built from cvfast's ONNX export, run inside the normal sampler.

`build_engines(pipe, out_dir, sizes=[(frames, height, width), ...])` exports one ONNX graph per size
(the positional tables are baked in, so a graph serves one video size) and builds one strongly
typed engine from each, with an optimisation profile over the batch (1 up to 2 x `batch`, the CFG
batch) and one timing cache shared by all builds. Next to each `<name>.plan` it writes
`<name>.plan.json`: the model variant, a hash of the transformer config, the latent shape, the text
length, the dtype, the batch range and the TensorRT version. `cvfast.load(..., backend="tensorrt",
engine=PATH)` reads that file first and refuses an engine built for another model, precision or
size with a message naming which; the engine then replaces the PyTorch transformer in the loop.

Strongly typed networks take the precision the ONNX graph carries, so the graph is exported in the
engine's dtype: bf16 (every model), fp16 (2B only: 5B and 1.5 overflow in fp16) or fp32. fp8 later.

Not yet run anywhere: TensorRT cannot be installed on the machines this was written on (no GPU);
tests/test_cuda.py builds and checks an engine where TensorRT is present.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CVFastInputError, bad_arg
from .onnx_export import OFS_INPUT, OUTPUT_NAME, export_onnx, export_shapes

ENGINE_FORMAT = 1
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class EngineMismatchError(CVFastInputError):
    """An engine built for another model, size or precision than asked."""


def require_tensorrt():
    from .cli import TENSORRT_MISSING
    try:
        import tensorrt
    except ImportError:
        raise CVFastInputError(TENSORRT_MISSING) from None
    return tensorrt


def config_hash(cfg) -> str:
    """What identifies a transformer architecture: its whole config, hashed."""
    blob = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def engine_spec(pipe, frames: int, height: int, width: int, batch: int, dtype: torch.dtype, text_len: int,
                tensorrt_version: str) -> dict:
    shapes = export_shapes(pipe, frames, height, width, text_len)
    return {"format": ENGINE_FORMAT, "variant": pipe.config.variant, "config_hash": config_hash(pipe.config),
            "model": str(pipe.name), "frames": frames, "height": height, "width": width,
            "latent": list(shapes["hidden_states"]), "text_len": text_len, "dtype": _DTYPE_NAMES[dtype],
            "batch": [1, 2 * batch], "tensorrt": tensorrt_version}


def read_spec(engine_path) -> dict:
    """The `.plan.json` written beside an engine; CVFastInputError when it or the engine is missing."""
    engine_path = Path(engine_path)
    meta = engine_path.with_name(engine_path.name + ".json")
    if not engine_path.is_file():
        raise bad_arg("engine", str(engine_path), "an existing engine file written by `cvfast export tensorrt`")
    if not meta.is_file():
        raise bad_arg("engine", str(engine_path), f"an engine with its {meta.name} beside it (written by `cvfast "
                      "export tensorrt`): without it the model, size and precision it was built for are unknown")
    spec = json.loads(meta.read_text())
    if spec.get("format") != ENGINE_FORMAT:
        raise EngineMismatchError(f"{meta}: engine format {spec.get('format')!r}, this cvfast reads {ENGINE_FORMAT}")
    return spec


def check_model(spec: dict, cfg, dtype: torch.dtype, engine_path) -> None:
    """Refuse an engine built for another architecture or precision."""
    if spec["variant"] != cfg.variant or spec["config_hash"] != config_hash(cfg):
        raise EngineMismatchError(
            f"engine {engine_path} was built for a {spec['variant']} model (config {spec['config_hash']}, from "
            f"{spec['model']}), not this {cfg.variant} model (config {config_hash(cfg)}): rebuild it from this model")
    if spec["dtype"] != _DTYPE_NAMES[dtype]:
        raise EngineMismatchError(f"engine {engine_path} runs in {spec['dtype']}, not {_DTYPE_NAMES[dtype]}: "
                                  f"load with dtype={spec['dtype']!r} or rebuild it")


def check_size(spec: dict, latent_shape: tuple[int, ...], text_len: int, batch: int, engine_path) -> None:
    """Refuse a generate() call whose size the engine was not built for (before any work runs).
    latent_shape: (latent_frames, channels, h, w); batch: the transformer's (2x the prompts with CFG)."""
    frames, _, lh, lw = latent_shape
    if [frames, lh, lw] != [spec["latent"][0], *spec["latent"][2:]] or text_len != spec["text_len"]:
        raise EngineMismatchError(
            f"engine {engine_path} was built for {spec['frames']} frames at {spec['height']}x{spec['width']} with "
            f"{spec['text_len']} text tokens; build one for this size (cvfast export tensorrt --size F,H,W)")
    if not spec["batch"][0] <= batch <= spec["batch"][1]:
        raise EngineMismatchError(f"engine {engine_path} takes a transformer batch of {spec['batch'][0]} to "
                                  f"{spec['batch'][1]}, this call needs {batch}: rebuild it with a larger --batch")


def _build_one(trt, onnx_path: Path, plan_path: Path, batch_range: tuple[int, int], cache_path: Path,
               workspace_gib: float | None) -> None:
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
    plan_path.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))


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
        _build_one(trt, onnx_path, plan_path, tuple(spec["batch"]), cache_path, workspace_gib)
        plan_path.with_name(plan_path.name + ".json").write_text(json.dumps(spec, indent=1))
        plans.append(plan_path)
    return plans


class TensorRTTransformer(nn.Module):
    """Runs a cvfast engine with the PyTorch transformer's call: forward(latents, text, timestep,
    tables, ofs) -> (B, F, C_out, h, w). The engine holds its weights and positional tables, so
    `tables` is ignored and `position_tables` returns none."""

    def __init__(self, engine_path, spec: dict, cfg, device: torch.device):
        super().__init__()
        trt = require_tensorrt()
        self.cfg, self.spec, self.engine_path, self.device = cfg, spec, Path(engine_path), device
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise CVFastInputError(f"engine {engine_path} could not be deserialised by TensorRT {trt.__version__} "
                                   f"(built with {spec['tensorrt']}): rebuild it on this machine")
        self.context = self.engine.create_execution_context()

    def position_tables(self, *args, **kwargs) -> dict:
        return {}

    def check_request(self, latent_shape: tuple[int, ...], text_len: int, batch: int) -> None:
        check_size(self.spec, latent_shape, text_len, batch, self.engine_path)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor, tables: dict,
                ofs: torch.Tensor | None = None) -> torch.Tensor:
        b = latents.shape[0]
        inputs = {"hidden_states": latents.contiguous(), "encoder_hidden_states": text.contiguous(),
                  "timestep": timestep.float().expand(b).contiguous()}  # the graph takes float timesteps
        if self.cfg.ofs_embed_dim:
            inputs[OFS_INPUT] = ofs.float().expand(b).contiguous()
        out = torch.empty((b, latents.shape[1], self.cfg.out_channels, *latents.shape[3:]), dtype=latents.dtype,
                          device=latents.device)
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(latents.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.engine_path}")
        return out
