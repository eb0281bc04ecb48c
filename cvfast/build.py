"""The one assembler: a `Checkpoint` (from any model source) and the runtime choices -> a `Pipeline`.
`cvfast.load`, the benchmarks and every model source go through `build`."""
from __future__ import annotations

import torch

from .checkpoints import Checkpoint, load_into
from .checkpoints.lora import LoRAs
from .core.errors import CVFastInputError
from .models.fp8 import quantize_linears
from .models.transformer import CogVideoXTransformer
from .models.vae import CogVideoXVAE
from .ops import OpSet
from .pipeline import Components, Pipeline
from .runtime import Runtime
from .runtime.compile import compile_blocks
from .runtime.tensorrt import TensorRTTransformer


def build(checkpoint: Checkpoint, runtime: Runtime, ops: OpSet, engine: TensorRTTransformer | None = None) -> Pipeline:
    """Build the modules on the meta device, put the checkpoint's tensors into them (cast to the
    runtime's dtype, where offloading keeps them), load the text encoder, merge a LoRA the checkpoint
    carries, then quantize the transformer's linears when the runtime's precision asks for FP8 ones
    (`ops` is then already `cvfast.ops.quantized.quantized(...)`), and compile its blocks when the
    runtime asks (`cvfast/runtime/compile.py`). engine: a TensorRT engine that
    replaces the transformer (whose weights are not read)."""
    t_cfg, v_cfg = checkpoint.transformer, checkpoint.vae
    if t_cfg.out_channels != v_cfg.latent_channels:
        raise CVFastInputError(f"{checkpoint.name}: transformer out_channels {t_cfg.out_channels} != VAE "
                               f"latent_channels {v_cfg.latent_channels}")
    parallel, home, dtype = runtime.parallel, runtime.offload.home, runtime.dtype
    with torch.device("meta"):
        transformer = None if engine is not None else CogVideoXTransformer(
            t_cfg, ops if parallel is None else parallel.transformer_ops(ops),
            sequence_parallel=None if parallel is None else parallel.sequence_parallel)
        vae = CogVideoXVAE(v_cfg, ops)
    if transformer is not None:
        load_into(transformer, checkpoint.transformer_tensors(), "transformer", dtype, home,
                  checkpoint.transformer_names)
    load_into(vae, checkpoint.vae_tensors(), "vae", dtype, home)
    text_encoder = checkpoint.text_encoder(home, dtype)
    loras = None if engine is not None else LoRAs(transformer)  # no LoRA reaches an engine's weights
    if loras is not None and checkpoint.lora is not None and (layers := checkpoint.lora()) is not None:
        loras.merge(layers, 1.0, checkpoint.lora_source, "checkpoint")
    if runtime.precision in ("fp8", "fp8-linear"):
        quantize_linears(transformer)
        loras = None  # a LoRA cannot be merged into (or taken out of) FP8 weights
    if runtime.compile:
        compile_blocks(transformer.blocks, runtime.compile)
    if transformer is not None:
        runtime.offload.stream(transformer.blocks)  # offload="sequential": one block on the device at a time
    if text_encoder.blocks() is not None:
        runtime.offload.stream(text_encoder.blocks())
    return Pipeline(Components(checkpoint.name, engine or transformer.eval(), vae.eval(), text_encoder,
                               checkpoint.scheduler, ops, checkpoint.defaults, loras), runtime)
