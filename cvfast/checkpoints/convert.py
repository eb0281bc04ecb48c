"""`cvfast convert-sat`: a SAT checkpoint directory written as a diffusers-layout folder (safetensors)
that cvfast.load and diffusers read. A LoRA in the checkpoint is merged into the written weights."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.errors import bad_arg
from ..core.files import replacing
from ..models.config import VAEConfig
from ..models.transformer import CogVideoXTransformer
from ..models.vae import CogVideoXVAE
from .checkpoint import Tensors, load_into
from .diffusers import read_config, to_diffusers_state_dict, transformer_state_dict
from .hub import read_json
from .lora import add_deltas, lora_deltas
from .sat import SatCheckpoint, base_configs, is_sat_dir, resolve_base, with_source


def check_against(module_cls, cfg, tensors: Tensors, component: str) -> None:
    """Names and shapes of `tensors` (cvfast names) against the module, built on the meta device."""
    with torch.device("meta"):
        module = module_cls(cfg)
    load_into(module, tensors, component, torch.float32, torch.device("meta"))


def write_component(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # clone: q/k/v (and norm1/norm2) are views of one SAT tensor, and safetensors refuses shared storage.
    save_file({k: t.detach().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()},
              str(folder / "diffusion_pytorch_model.safetensors"))


def convert_sat(sat_dir, out_dir, *, base=None, trust_pickle: bool = False) -> Path:
    """Write SAT_DIR as a diffusers-layout folder (safetensors) that cvfast.load and diffusers read.
    A LoRA in the checkpoint is merged into the written weights. Returns out_dir."""
    folder, out = Path(sat_dir).expanduser(), Path(out_dir).expanduser()
    if not is_sat_dir(folder):
        raise bad_arg("sat_dir", str(sat_dir), "a SAT checkpoint directory (transformer/latest, "
                      "transformer/<iteration>/mp_rank_00_model_states.pt, vae/3d-vae.pt, *.yaml)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise bad_arg("out_dir", str(out_dir), "a new or empty folder (nothing is overwritten)")
    ckpt = SatCheckpoint.open(folder)
    t_cfg, base_dir = ckpt.transformer_config(), resolve_base(base)
    vae_dict, scheduler_dict = base_configs(ckpt, base_dir)
    v_cfg = read_config(base_dir / "vae" / "config.json", VAEConfig, vae_dict)
    transformer, lora = ckpt.read_transformer(t_cfg, trust_pickle)
    ours = transformer_state_dict(with_source(transformer, ckpt.checkpoint))
    check_against(CogVideoXTransformer, t_cfg, ours, "transformer")
    vae = ckpt.read_vae(v_cfg, trust_pickle)
    check_against(CogVideoXVAE, v_cfg, vae, "vae")
    weights = {k: t for k, (t, _) in ours.items()}
    if lora is not None:
        deltas = lora_deltas(lora, weights, 1.0, str(ckpt.checkpoint))
        weights.update({name: weights[name].clone() for name in deltas})  # SAT's tensors stay untouched
        add_deltas(weights, deltas)
    transformer = to_diffusers_state_dict(weights, {k: t.shape for k, t in transformer.items()})

    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out, directory=True) as staging:  # the folder appears whole, or not at all
        write_component(staging / "transformer", dict(asdict(t_cfg), _class_name="CogVideoXTransformer3DModel"),
                        transformer)
        write_component(staging / "vae", vae_dict, {k: t for k, (t, _) in vae.items()})
        for part in ("text_encoder", "tokenizer", "scheduler"):
            shutil.copytree(base_dir / part, staging / part)
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_dict, indent=2) + "\n")
        index = read_json(base_dir / "model_index.json")
        index["_class_name"] = "CogVideoXImageToVideoPipeline" if t_cfg.is_image_to_video else "CogVideoXPipeline"
        (staging / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
