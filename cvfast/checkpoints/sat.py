"""SAT checkpoint directories as a `Checkpoint`: safe pickle loading, the yaml config, the base folder.

A SAT directory, as CogVideo's SAT engine downloads and fine-tunes it:

    SAT_DIR/
      *.yaml                                   the configs it was trained with (merged in name order)
      transformer/latest                       names the iteration, e.g. "1000"
      transformer/1000/mp_rank_00_model_states.pt
      vae/3d-vae.pt

Config: the transformer config comes from the yaml (`model.network_config.params`: sizes, patching,
which position embedding), the SNR shift from `model.denoiser_config` and the VAE scaling factor from
`model.scale_factor`; tensor shapes are then checked against it, so a yaml that does not describe the
checkpoint is an error naming the tensor. A SAT directory has no T5 encoder, tokenizer or scheduler
in diffusers form (SAT reads google/t5-v1_1-xxl on its own), so those, and the VAE's architecture
config, come from a `base` diffusers folder or hub id (e.g. THUDM/CogVideoX-5b); the VAE weights
are always the SAT directory's.

Pickles are read with `torch.load(weights_only=True, mmap=True)` and only the globals in
`ALLOWED_PICKLE_GLOBALS`. Anything else is refused with `UnsafePickleError`; `trust_pickle=True`
unpickles whatever the file holds, which runs code from the file.

`convert.py` writes a SAT directory as a diffusers-layout folder; `lora.py` reads SAT adapters.
"""
from __future__ import annotations

import argparse
import functools
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..core.errors import CVFastInputError, UnsafePickleError, bad_arg
from ..models.config import TransformerConfig, VAEConfig, generation_defaults
from ..sampler.schedulers import SchedulerConfig
from . import sat_names
from .checkpoint import Checkpoint, Tensors
from .diffusers import diffusers_name, read_config, scheduler_dict, text_encoder_loader, transformer_state_dict
from .hub import download, is_hub_id, read_json

# What SAT checkpoints hold besides tensors and builtins: the training arguments (an
# argparse.Namespace) that SAT/DeepSpeed save next to the weights, and NumPy arrays, scalars and dtypes
# (SAT saves NumPy's random-number state beside them). Data, nothing that can run code. The NumPy
# functions are also allowed under their NumPy 1 names, which files written before NumPy 2 use.
NUMPY_DATA = [(np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
              (np._core.multiarray.scalar, "numpy.core.multiarray.scalar")]
NUMPY_DTYPES = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
ALLOWED_PICKLE_GLOBALS = [argparse.Namespace, np.ndarray, np.dtype, np._core.multiarray._reconstruct,
                          np._core.multiarray.scalar, *NUMPY_DATA, *NUMPY_DTYPES]
CHECKPOINT_NAME = "mp_rank_00_model_states.pt"
# What a base hub repo must provide; never its transformer or VAE weights.
BASE_PATTERNS = ["model_index.json", "text_encoder/*", "tokenizer/*", "scheduler/*", "vae/config.json"]
BASE_PARTS = ("text_encoder", "tokenizer", "scheduler/scheduler_config.json", "vae/config.json", "model_index.json")


def load_pickle(path: Path, trust_pickle: bool = False):
    """torch.load restricted to tensors, builtins and ALLOWED_PICKLE_GLOBALS, memory-mapped;
    with trust_pickle=True anything (which runs whatever code the file names)."""
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        with torch.serialization.safe_globals(ALLOWED_PICKLE_GLOBALS):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"the global {found[1]}" if found else f"content the safe loader refuses ({str(exc).splitlines()[-1]})"
        allowed = "argparse.Namespace and NumPy's arrays, scalars and dtypes"
        raise UnsafePickleError(
            f"{path} holds {what}, which is not among the globals SAT checkpoints need ({allowed}); "
            "unpickling it could run code from the file. If you trust the file, pass trust_pickle=True "
            "(command line: --trust-pickle).") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise CVFastInputError(f"{path} cannot be read as a torch checkpoint: {exc}") from None


def state_dict_of(obj, path: Path) -> dict[str, torch.Tensor]:
    """The weights of a loaded checkpoint: under "module" (SAT/DeepSpeed), "model" or "state_dict"
    (the VAE's 3d-vae.pt), or the object itself."""
    for key in ("module", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CVFastInputError(f"{path}: no state dict (a dict of tensors, possibly under 'module') in it")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CVFastInputError(f"{path}: state dict entries that are not tensors: {not_tensors[:8]}")
    return obj


def transformer_dir(path: Path) -> Path | None:
    """The folder holding SAT's `latest` file: SAT_DIR/transformer, or a fine-tune's save folder."""
    for candidate in (path / "transformer", path):
        if (candidate / "latest").is_file():
            return candidate
    return None


def is_sat_dir(path: Path) -> bool:
    return (path / "transformer" / "latest").is_file() and not (path / "model_index.json").exists()


def checkpoint_file(folder: Path) -> Path:
    """transformer/<latest iteration>/mp_rank_00_model_states.pt, checked to exist alone."""
    iteration = (folder / "latest").read_text().strip()
    ckpt = folder / iteration / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise CVFastInputError(f"{folder / 'latest'} names iteration {iteration!r}, but {ckpt} does not exist")
    shards = sorted(p.name for p in ckpt.parent.glob("mp_rank_*_model_states.pt") if p != ckpt)
    if shards:
        raise CVFastInputError(f"{ckpt.parent} holds model-parallel shards {shards}: only model_parallel_size 1 "
                               "checkpoints are read (merge the shards with SAT first)")
    return ckpt


def merge_yaml(into: dict, other: dict) -> dict:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_yaml(into[key], value)
        else:
            into[key] = value
    return into


def read_yaml(folder: Path) -> dict:
    """The SAT yaml files of a folder merged in name order (as SAT merges its --base configs)."""
    merged: dict = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            merge_yaml(merged, yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError as exc:
            raise CVFastInputError(f"{path} is not valid yaml: {exc}") from None
    return merged


def lora_alpha(config: dict) -> float:
    """SAT's LoraMixin lora_alpha from a yaml (model.lora_config or the network's modules.lora_config);
    1, SAT's default, when the yaml does not set it."""
    model = config.get("model", {})
    for section in (model.get("lora_config"), model.get("network_config", {}).get("params", {})
                    .get("modules", {}).get("lora_config")):
        if section:
            return float(section.get("params", {}).get("lora_alpha", 1.0))
    return 1.0


@dataclass(frozen=True)
class SatCheckpoint:
    folder: Path
    config: dict
    checkpoint: Path
    vae: Path

    @classmethod
    def open(cls, folder: Path) -> SatCheckpoint:
        """Checks the layout and reads the yaml; no weights are read yet."""
        config = read_yaml(folder)
        if "params" not in config.get("model", {}).get("network_config", {}):
            raise CVFastInputError(
                f"{folder} is a SAT checkpoint without its yaml config: copy the yaml(s) it was trained with "
                "(e.g. CogVideo's sat/configs/cogvideox_5b.yaml) into it; model.network_config.params gives the "
                "transformer's architecture")
        vae = folder / "vae" / "3d-vae.pt"
        if not vae.is_file():
            raise CVFastInputError(f"{vae} is missing: a SAT directory has vae/3d-vae.pt next to transformer/")
        return cls(folder, config, checkpoint_file(folder / "transformer"), vae)

    def transformer_config(self) -> TransformerConfig:
        try:
            return TransformerConfig.from_dict(sat_names.transformer_config(self.config["model"]["network_config"]["params"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CVFastInputError(f"{self.folder}: the yaml's model.network_config.params cannot describe a "
                                   f"CogVideoX transformer ({type(exc).__name__}: {exc})") from None

    def snr_shift_scale(self) -> float:
        """The ZeroSNRDDPMDiscretization shift_scale of the denoiser (SAT's default 1.0)."""
        denoiser = self.config["model"].get("denoiser_config", {}).get("params", {})
        return float(denoiser.get("discretization_config", {}).get("params", {}).get("shift_scale", 1.0))

    def read_transformer(self, cfg: TransformerConfig, trust_pickle: bool) -> tuple[dict, dict | None]:
        """(diffusers-named denoiser tensors, the LoRA layers the checkpoint carries or None)."""
        state = state_dict_of(load_pickle(self.checkpoint, trust_pickle), self.checkpoint)
        tensors = sat_names.transformer_to_diffusers(state, cfg.use_learned_positional_embeddings, str(self.checkpoint))
        lora = sat_names.lora_layers(state, lora_alpha(self.config), str(self.checkpoint)) if sat_names.has_lora(state) else None
        return tensors, lora

    def read_vae(self, cfg: VAEConfig, trust_pickle: bool) -> Tensors:
        """{diffusers (= cvfast) VAE name: (tensor, 'file:name')}."""
        state = state_dict_of(load_pickle(self.vae, trust_pickle), self.vae)
        tensors = sat_names.vae_to_diffusers(state, len(cfg.block_out_channels), str(self.vae))
        return {k: (t, f"{self.vae}:{k}") for k, t in tensors.items()}


def resolve_base(base) -> Path:
    """The diffusers folder that supplies text encoder, tokenizer, scheduler and VAE config."""
    if base is None:
        raise bad_arg("base", None, "a diffusers-layout CogVideoX folder or hub id (e.g. 'THUDM/CogVideoX-5b'): a SAT "
                      "checkpoint has no T5 text encoder, tokenizer or scheduler in diffusers form, so they are "
                      "taken from there (command line: --base)")
    path = Path(base).expanduser()
    if not path.is_dir():
        if not is_hub_id(base):
            raise bad_arg("base", str(base), "an existing diffusers-layout folder or a hub id 'org/name'")
        path = download(str(base), BASE_PATTERNS)
    missing = [part for part in BASE_PARTS if not (path / part).exists()]
    if missing:
        raise bad_arg("base", str(base), f"a diffusers-layout CogVideoX folder; it lacks {missing}")
    return path


def base_configs(ckpt: SatCheckpoint, base: Path) -> tuple[dict, dict]:
    """diffusers' (VAE config, scheduler config) of the base, with the SAT yaml's scaling factor and
    SNR shift."""
    vae = read_json(base / "vae" / "config.json")
    if "scale_factor" in ckpt.config["model"]:
        vae["scaling_factor"] = float(ckpt.config["model"]["scale_factor"])
    scheduler = dict(scheduler_dict(base), snr_shift_scale=ckpt.snr_shift_scale())
    return vae, scheduler


def with_source(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    return {key: (tensor, path) for key, tensor in tensors.items()}


def open_sat(folder: Path, base, trust_pickle: bool, check: Callable[[TransformerConfig], None]) -> Checkpoint:
    """The Checkpoint of a SAT directory; `check` sees the transformer config before the base is
    fetched or any weight is read. The checkpoint's pickle is read once, when the assembler asks for
    the weights; a LoRA it carries comes with them (merged by the assembler, unload_lora() removes it)."""
    ckpt = SatCheckpoint.open(folder)
    transformer = ckpt.transformer_config()
    check(transformer)
    base_dir = resolve_base(base)
    vae_dict, scheduler_data = base_configs(ckpt, base_dir)
    vae = read_config(base_dir / "vae" / "config.json", VAEConfig, vae_dict)
    scheduler = read_config(base_dir / "scheduler" / "scheduler_config.json", SchedulerConfig, scheduler_data)
    read = functools.cache(lambda: ckpt.read_transformer(transformer, trust_pickle))
    return Checkpoint(
        name=str(folder), transformer=transformer, vae=vae, scheduler=scheduler,
        transformer_tensors=lambda: transformer_state_dict(with_source(read()[0], ckpt.checkpoint)),
        vae_tensors=lambda: ckpt.read_vae(vae, trust_pickle), text_encoder=text_encoder_loader(base_dir),
        defaults=generation_defaults(transformer, vae), lora=lambda: read()[1], lora_source=str(ckpt.checkpoint),
        transformer_names=lambda key: f"{diffusers_name(key)} (diffusers' name of it)")
