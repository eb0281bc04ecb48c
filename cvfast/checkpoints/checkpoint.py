"""What every model source (a diffusers folder, a hub id, a SAT directory, the embedded `tiny`) hands
the assembler: a `Checkpoint`, and `load_into`, which puts its tensors into the modules."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..core.errors import WeightError
from ..models.config import TransformerConfig, VAEConfig
from ..models.text_encoder import TextEncoder
from ..sampler.schedulers import SchedulerConfig

Tensors = dict[str, tuple[torch.Tensor, str]]  # cvfast name -> (tensor, where it came from: "file:key")


@dataclass(frozen=True)
class Checkpoint:
    """A model before it is built: configs read and checked, weights not read yet.

    transformer_tensors / vae_tensors: read the weights under cvfast's module names (called once, by
    the assembler); transformer_tensors is None when the transformer runs elsewhere (a TensorRT
    engine). text_encoder(device, dtype): the T5 encoder with its tokenizer. defaults: generate()'s
    defaults (num_frames, height, width, fps). lora(): the adapter layers the checkpoint carries (a
    SAT fine-tune) or None, merged once the model is built; `lora_source` names where they came from."""
    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    scheduler: SchedulerConfig
    transformer_tensors: Callable[[], Tensors] | None
    vae_tensors: Callable[[], Tensors]
    text_encoder: Callable[[torch.device, torch.dtype], TextEncoder]
    defaults: dict
    lora: Callable[[], dict | None] | None = field(default=None, repr=False)
    lora_source: str = ""
    transformer_names: Callable[[str], str] = str  # a cvfast tensor name -> the checkpoint's, for messages


def load_into(module: nn.Module, named: Tensors, component: str, dtype: torch.dtype, device: torch.device,
              names: Callable[[str], str] = str) -> None:
    """Copy every tensor into `module`'s parameters (cast to dtype, moved to device), checking that
    the two sides name exactly the same tensors with the same shapes; `names` gives the checkpoint's
    name of a module tensor, so that a missing one is named as the user's file would name it."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(named))
    if missing:
        raise WeightError(f"{component}: checkpoint lacks {len(missing)} tensors, e.g. "
                          + ", ".join(f"{names(k)} {tuple(expected[k].shape)}" for k in missing[:5]))
    extra = sorted(set(named) - set(expected))
    if extra:
        raise WeightError(f"{component}: unexpected tensors {[named[k][1] for k in extra[:5]]}")
    for key, (tensor, where) in named.items():
        if tensor.shape != expected[key].shape:
            raise WeightError(f"{component}: {where} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(expected[key].shape)} for {key}")
    # assign=True lets the module be built on the meta device: no random init of billions of
    # parameters that are overwritten at once, and no second copy of the weights in memory.
    module.load_state_dict({k: t.to(device=device, dtype=dtype) for k, (t, _) in named.items()},
                           strict=True, assign=True)
    module.requires_grad_(False)
