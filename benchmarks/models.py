"""Pipelines to measure: the embedded tiny model, or a real CogVideoX architecture with random
weights (no checkpoint reaches a lent GPU machine; timings do not depend on the values), built by
cvfast's one assembler, and the same weights inside diffusers' pipeline for the side-by-side baseline."""
from __future__ import annotations

import dataclasses

import torch

import cvfast
from cvfast.build import build as assemble
from cvfast.checkpoints import Checkpoint, Tensors
from cvfast.checkpoints.diffusers import to_diffusers_state_dict
from cvfast.checkpoints.tiny import char_tokenizer
from cvfast.models.config import PRESETS, VAEConfig, generation_defaults
from cvfast.models.text_encoder import TextEncoder
from cvfast.models.transformer import CogVideoXTransformer
from cvfast.models.vae import CogVideoXVAE
from cvfast.ops import resolve
from cvfast.ops.quantized import check_precision, quantized
from cvfast.pipeline import Pipeline
from cvfast.runtime import Offload, Runtime
from cvfast.runtime import parallel as par
from cvfast.runtime.compile import check_compile
from cvfast.sampler.schedulers import SchedulerConfig

MODELS = ("tiny", "2b", "5b", "1.5-5b")
# diffusers' vae/config.json of the THUDM releases (2B ships scaling 1.15258426, 5B and 1.5 0.7).
REAL_VAE = dict(block_out_channels=[128, 256, 256, 512], latent_channels=16, layers_per_block=3,
                norm_num_groups=32, temporal_compression_ratio=4)
# google/t5-v1_1-xxl encoder, as CogVideoX ships it (4.7B parameters).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)


def random_(module: torch.nn.Module, device, dtype, seed: int = 0) -> torch.nn.Module:
    """Materialise a meta-built module on `device` with small random weights, norms at 1."""
    module.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name.lower() and name.endswith("weight") or name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return module.to(dtype).eval().requires_grad_(False)


def random_tensors(module_cls, cfg, device, dtype, seed: int) -> Tensors:
    with torch.device("meta"):
        module = module_cls(cfg)
    return {key: (t, f"random:{key}") for key, t in random_(module, device, dtype, seed).state_dict().items()}


def random_checkpoint(model: str, device: torch.device, dtype: torch.dtype) -> Checkpoint:
    """A real architecture (`PRESETS[model]`, CogVideoX's VAE and T5-XXL) with random weights made on
    `device` when the assembler asks."""
    from transformers import T5Config, T5EncoderModel
    cfg = PRESETS[model]
    vae = VAEConfig.from_dict(dict(REAL_VAE, scaling_factor=1.15258426 if model == "2b" else 0.7))

    def text_encoder(home: torch.device, dtype: torch.dtype) -> TextEncoder:
        with torch.device("meta"):
            t5 = T5EncoderModel(T5Config(**T5_XXL))
        return TextEncoder(char_tokenizer(), random_(t5, home, dtype))
    return Checkpoint(name=f"{model} (random weights)", transformer=cfg, vae=vae,
                      scheduler=SchedulerConfig(kind="ddim", snr_shift_scale=3.0 if model == "2b" else 1.0),
                      transformer_tensors=lambda: random_tensors(CogVideoXTransformer, cfg, device, dtype, 0),
                      vae_tensors=lambda: random_tensors(CogVideoXVAE, vae, device, dtype, 0),
                      text_encoder=text_encoder, defaults=generation_defaults(cfg, vae))


def build(model: str, device: torch.device, dtype: torch.dtype, backend: str, parallel: str | None = None,
          precision: str = "bf16", compile: bool | str = False) -> Pipeline:
    """A cvfast Pipeline for `model` ("tiny" or a real architecture with random weights); parallel,
    precision, compile: as in `cvfast.load` (parallel in a program started by torchrun)."""
    if model == "tiny":
        return cvfast.load("tiny", device=device, dtype=dtype, backend=backend, parallel=parallel, precision=precision,
                           compile=compile)
    check_precision(precision, device, dtype)
    compile = check_compile(compile, engine=False, parallel=parallel is not None)
    checkpoint = random_checkpoint(model, device, dtype)
    config = par.parse(parallel)
    context = None
    if config is not None:
        par.check_launch(config, "none", "auto")
        par.check_model(config, checkpoint.transformer)
        context = par.ParallelContext(config, device)
    return assemble(checkpoint, Runtime(device, dtype, Offload("none", device), "auto", context, precision=precision,
                                        compile=compile),
                    quantized(resolve(backend, device), precision, device))


def diffusers_pipeline(pipe: Pipeline):
    """diffusers' CogVideoXPipeline holding the same weights as `pipe` (copied; the T5 encoder is
    shared), for a baseline measured in the same run. Raises ImportError without diffusers."""
    import diffusers

    cfg, vcfg, scfg = pipe.transformer.cfg, pipe.vae.config, pipe.scheduler
    # Built on the device (not on meta) so that diffusers' own non-persistent buffers, such as the
    # 2B sincos table, are computed; then cast and filled with cvfast's tensors.
    with torch.device(pipe.device):
        transformer = diffusers.CogVideoXTransformer3DModel(**dataclasses.asdict(cfg)).to(pipe.dtype)
        vae = diffusers.AutoencoderKLCogVideoX(**dataclasses.asdict(vcfg)).to(pipe.dtype)
    shapes = {k: v.shape for k, v in transformer.state_dict().items()}
    transformer.load_state_dict(to_diffusers_state_dict(pipe.transformer.state_dict(), shapes))
    vae.load_state_dict(pipe.vae.state_dict())
    sched_cls = diffusers.CogVideoXDDIMScheduler if scfg.kind == "ddim" else diffusers.CogVideoXDPMScheduler
    scheduler = sched_cls(**{k: v for k, v in dataclasses.asdict(scfg).items() if k != "kind"}, clip_sample=False)
    out = diffusers.CogVideoXPipeline(tokenizer=pipe.text_encoder.tokenizer, text_encoder=pipe.text_encoder.model,
                                      vae=vae.eval(), transformer=transformer.eval(), scheduler=scheduler)
    out.set_progress_bar_config(disable=True)
    return out
