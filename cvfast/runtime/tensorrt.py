"""Running a TensorRT engine of the denoiser (built by `cvfast export tensorrt`) inside the normal
sampler loop, and the checks that refuse an engine built for another model, size or precision.

Beside each `<name>.plan` the export writes `<name>.plan.json`: the model variant, a hash of the
transformer config, the latent shape, the text length, the dtype, the batch range and the TensorRT
version. `read_spec` reads it first, so every refusal names what differs before anything heavy runs.

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

from ..core.errors import CVFastInputError, EngineMismatchError, bad_arg

ENGINE_FORMAT = 2  # 2: the spec records the plan's size
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# The engine's (and the exported ONNX graph's) tensors.
INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "timestep")
OFS_INPUT = "ofs"
OUTPUT_NAME = "noise_pred"
TENSORRT_MISSING = (
    "TensorRT is not installed (the Python package `tensorrt` cannot be imported). Install it on a machine "
    "with an NVIDIA GPU and CUDA: `pip install tensorrt` (it must match the CUDA/driver of that machine). "
    "The ONNX export does not need it: `cvfast export onnx --model M --out DIR` works here, and the engine "
    "can be built from that file later (see the README.txt that --serving-repo writes).")


def require_tensorrt():
    """The tensorrt module, or a CVFastInputError saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise CVFastInputError(TENSORRT_MISSING) from None
    return tensorrt


def config_hash(cfg) -> str:
    """What identifies a transformer architecture: its whole config, hashed."""
    blob = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
        raise EngineMismatchError(f"{meta}: engine format {spec.get('format')!r}, this cvfast reads {ENGINE_FORMAT}: "
                                  "rebuild the engine (cvfast export tensorrt)")
    if engine_path.stat().st_size != spec["plan_bytes"]:
        raise EngineMismatchError(f"{engine_path} has {engine_path.stat().st_size} bytes, its {meta.name} was "
                                  f"written for a {spec['plan_bytes']}-byte engine: the two come from different "
                                  "builds; rebuild the engine (cvfast export tensorrt)")
    return spec


def check_model(spec: dict, cfg, dtype: torch.dtype, engine_path) -> None:
    """Refuse an engine built for another architecture or precision."""
    if spec["variant"] != cfg.variant or spec["config_hash"] != config_hash(cfg):
        raise EngineMismatchError(
            f"engine {engine_path} was built for a {spec['variant']} model (config {spec['config_hash']}, from "
            f"{spec['model']}), not this {cfg.variant} model (config {config_hash(cfg)}): rebuild it from this model")
    if spec["dtype"] != DTYPE_NAMES[dtype]:
        raise EngineMismatchError(f"engine {engine_path} runs in {spec['dtype']}, not {DTYPE_NAMES[dtype]}: "
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
