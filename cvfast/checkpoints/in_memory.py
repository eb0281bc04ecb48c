"""A diffusers CogVideoX pipeline already in memory as a model source (`cvfast.from_diffusers`): its
configs, weights, tokenizer, text encoder and scheduler as they are now — a swapped scheduler or
edited weights included — read without writing a folder.

The transformer's and the VAE's weights are copied into cvfast's modules (cvfast fuses q, k and v
into one projection and merges LoRAs in place; the diffusers pipeline's stay as they were, and it
can be freed). The T5 encoder, the largest part (9.5 GB in bf16), is not copied when it is already
where and in the dtype cvfast keeps it, but shared: it is never cast, and only offloading
(`offload="model"` or `"sequential"`) moves it, with cvfast's stages. Otherwise it is copied."""
from __future__ import annotations

import copy
from typing import Callable

import torch

from ..core.errors import bad_arg
from ..models.config import TransformerConfig, VAEConfig, generation_defaults
from ..models.text_encoder import TextEncoder
from ..sampler.schedulers import SchedulerConfig
from .checkpoint import Checkpoint, Tensors
from .diffusers import diffusers_name, read_config, transformer_state_dict

COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")


def is_pipeline(model) -> bool:
    """Whether `model` looks like a diffusers CogVideoX pipeline object (checked without importing diffusers)."""
    return all(hasattr(model, name) for name in COMPONENTS) and hasattr(model.transformer, "config")


def open_pipeline(pipeline, check: Callable[[TransformerConfig], None]) -> Checkpoint:
    """The Checkpoint of an in-memory diffusers pipeline; `check` sees its transformer config first."""
    missing = [name for name in COMPONENTS if getattr(pipeline, name) is None]
    if missing:
        raise bad_arg("pipeline", type(pipeline).__name__, f"a CogVideoX pipeline with all its components "
                      f"(missing: {', '.join(missing)})")
    label = f"{type(pipeline).__name__} in memory"
    transformer = read_config(f"{label}: transformer.config", TransformerConfig, dict(pipeline.transformer.config))
    check(transformer)
    vae = read_config(f"{label}: vae.config", VAEConfig, dict(pipeline.vae.config))
    # The scheduler object's class says which sampler it is, whatever its config was loaded from.
    scheduler = read_config(f"{label}: scheduler", SchedulerConfig,
                            {**pipeline.scheduler.config, "_class_name": type(pipeline.scheduler).__name__})

    def transformer_tensors() -> Tensors:
        where = f"{label}: transformer"
        return transformer_state_dict({key: (t.detach().clone(), where)
                                       for key, t in pipeline.transformer.state_dict().items()})

    def vae_tensors() -> Tensors:
        return {key: (t.detach().clone(), f"{label}: vae.{key}") for key, t in pipeline.vae.state_dict().items()}

    def text_encoder(device: torch.device, dtype: torch.dtype) -> TextEncoder:
        model = pipeline.text_encoder
        first = next(model.parameters())
        if first.device != device or first.dtype != dtype:
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        return TextEncoder(pipeline.tokenizer, model.eval().requires_grad_(False))
    return Checkpoint(name=label, transformer=transformer, vae=vae, scheduler=scheduler,
                      transformer_tensors=transformer_tensors, vae_tensors=vae_tensors, text_encoder=text_encoder,
                      defaults=generation_defaults(transformer, vae), transformer_names=diffusers_name)
