"""SAT checkpoint directories: safe pickle loading, the yaml config, `load` and `convert-sat`.

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
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CVFastInputError, bad_arg
from .loading import _check_fp16, _download, _read_json, assemble, check_parallel
from .models import sat
from .models.config import TransformerConfig
from .models.lora import lora_deltas, read_lora
from .models.transformer import CogVideoXTransformer
from .models.vae import CogVideoXVAE, VAEConfig
from .models.weights import load_into, to_diffusers_state_dict, transformer_state_dict
from .sampler.schedulers import SchedulerConfig

# What SAT checkpoints hold besides tensors and builtins: the training arguments (an
# argparse.Namespace) that SAT/DeepSpeed save next to the weights. Nothing that can run code.
ALLOWED_PICKLE_GLOBALS = [argparse.Namespace]
CHECKPOINT_NAME = "mp_rank_00_model_states.pt"
# What a base hub repo must provide; never its transformer or VAE weights.
_BASE_PATTERNS = ["model_index.json", "text_encoder/*", "tokenizer/*", "scheduler/*", "vae/config.json"]
_BASE_PARTS = ("text_encoder", "tokenizer", "scheduler/scheduler_config.json", "vae/config.json", "model_index.json")


class UnsafePickleError(CVFastInputError):
    """A pickle holds a global outside the allowlist; loading it anyway needs trust_pickle=True."""


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
        allowed = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_PICKLE_GLOBALS)
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


def _merge(into: dict, other: dict) -> dict:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def read_yaml(folder: Path) -> dict:
    """The SAT yaml files of a folder merged in name order (as SAT merges its --base configs)."""
    merged: dict = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            _merge(merged, yaml.safe_load(path.read_text()) or {})
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
            return TransformerConfig.from_dict(sat.transformer_config(self.config["model"]["network_config"]["params"]))
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
        tensors = sat.transformer_to_diffusers(state, cfg.use_learned_positional_embeddings, str(self.checkpoint))
        lora = sat.lora_layers(state, lora_alpha(self.config), str(self.checkpoint)) if sat.has_lora(state) else None
        return tensors, lora

    def read_vae(self, cfg: VAEConfig, trust_pickle: bool) -> dict[str, tuple[torch.Tensor, str]]:
        """{diffusers (= cvfast) VAE name: (tensor, 'file:name')}."""
        state = state_dict_of(load_pickle(self.vae, trust_pickle), self.vae)
        tensors = sat.vae_to_diffusers(state, len(cfg.block_out_channels), str(self.vae))
        return {k: (t, f"{self.vae}:{k}") for k, t in tensors.items()}


def resolve_base(base) -> Path:
    """The diffusers folder that supplies text encoder, tokenizer, scheduler and VAE config."""
    if base is None:
        raise bad_arg("base", None, "a diffusers-layout CogVideoX folder or hub id (e.g. 'THUDM/CogVideoX-5b'): a SAT "
                      "checkpoint has no T5 text encoder, tokenizer or scheduler in diffusers form, so they are "
                      "taken from there (command line: --base)")
    path = Path(base).expanduser()
    if not path.is_dir():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)):
            raise bad_arg("base", str(base), "an existing diffusers-layout folder or a hub id 'org/name'")
        path = _download(str(base), _BASE_PATTERNS)
    missing = [part for part in _BASE_PARTS if not (path / part).exists()]
    if missing:
        raise bad_arg("base", str(base), f"a diffusers-layout CogVideoX folder; it lacks {missing}")
    return path


def _base_configs(ckpt: SatCheckpoint, base: Path) -> tuple[dict, dict]:
    """diffusers' (VAE config, scheduler config) of the base, with the SAT yaml's scaling factor and
    SNR shift."""
    vae = _read_json(base / "vae" / "config.json")
    if "scale_factor" in ckpt.config["model"]:
        vae["scaling_factor"] = float(ckpt.config["model"]["scale_factor"])
    scheduler = dict(_read_json(base / "scheduler" / "scheduler_config.json"), snr_shift_scale=ckpt.snr_shift_scale())
    return vae, scheduler


def _with_source(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    return {key: (tensor, path) for key, tensor in tensors.items()}


def load_sat(folder: Path, base, trust_pickle: bool, device: torch.device, dtype: torch.dtype, ops,
             allow_fp16: bool, offload: str, parallel=None):
    """A Pipeline from a SAT directory; a LoRA in its checkpoint is merged (unload_lora() removes it).
    parallel: a `cvfast.parallel.ParallelConfig` to check against the model before the weights load."""
    ckpt = SatCheckpoint.open(folder)
    t_cfg = ckpt.transformer_config()
    _check_fp16(dtype, t_cfg, allow_fp16)
    check_parallel(parallel, t_cfg)
    base_dir = resolve_base(base)
    vae_dict, scheduler_dict = _base_configs(ckpt, base_dir)
    v_cfg, s_cfg = VAEConfig.from_dict(vae_dict), SchedulerConfig.from_dict(scheduler_dict)
    transformer, lora = ckpt.read_transformer(t_cfg, trust_pickle)
    pipe = assemble(t_cfg, v_cfg, s_cfg, lambda: transformer_state_dict(_with_source(transformer, ckpt.checkpoint)),
                    lambda: ckpt.read_vae(v_cfg, trust_pickle),
                    base_dir, device, dtype, ops, offload, str(folder))
    if lora is not None:
        pipe.merge_lora(lora, 1.0, str(ckpt.checkpoint))
    return pipe


def _checked(module_cls, cfg, tensors: dict, component: str) -> None:
    """Names and shapes of `tensors` (cvfast names) against the module, built on the meta device."""
    with torch.device("meta"):
        module = module_cls(cfg)
    load_into(module, tensors, component, torch.float32, torch.device("meta"))


def _write_component(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
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
    if out.exists() and any(out.iterdir()):
        raise bad_arg("out_dir", str(out_dir), "a new or empty folder (nothing is overwritten)")
    ckpt = SatCheckpoint.open(folder)
    t_cfg, base_dir = ckpt.transformer_config(), resolve_base(base)
    vae_dict, scheduler_dict = _base_configs(ckpt, base_dir)
    v_cfg = VAEConfig.from_dict(vae_dict)
    transformer, lora = ckpt.read_transformer(t_cfg, trust_pickle)
    ours = transformer_state_dict(_with_source(transformer, ckpt.checkpoint))
    _checked(CogVideoXTransformer, t_cfg, ours, "transformer")
    vae = ckpt.read_vae(v_cfg, trust_pickle)
    _checked(CogVideoXVAE, v_cfg, vae, "vae")
    weights = {k: t for k, (t, _) in ours.items()}
    if lora is not None:
        for name, parts in lora_deltas(lora, weights, 1.0, str(ckpt.checkpoint)).items():
            weights[name] = weights[name].clone()
            for rows, delta in parts:
                weights[name][rows] += delta.to(weights[name].dtype)
    transformer = to_diffusers_state_dict(weights, {k: t.shape for k, t in transformer.items()})

    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        _write_component(tmp / "transformer", dict(asdict(t_cfg), _class_name="CogVideoXTransformer3DModel"),
                         transformer)
        _write_component(tmp / "vae", vae_dict, {k: t for k, (t, _) in vae.items()})
        for part in ("text_encoder", "tokenizer", "scheduler"):
            shutil.copytree(base_dir / part, tmp / part)
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_dict, indent=2) + "\n")
        index = _read_json(base_dir / "model_index.json")
        index["_class_name"] = "CogVideoXImageToVideoPipeline" if t_cfg.is_image_to_video else "CogVideoXPipeline"
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _is_sat_safetensors(path: Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return any(sat.LORA_KEY.fullmatch(k) for k in f.keys())  # noqa: SIM118 (no __iter__)


def read_adapter(path, trust_pickle: bool = False) -> dict[str, dict]:
    """The layers of a LoRA file in any supported format ({diffusers layer: {"A", "B", "alpha"}}):
    a diffusers/PEFT safetensors, or SAT matrix_A/matrix_B adapters in a SAT directory (alpha from its
    yaml), a SAT save folder with `latest`, a SAT .pt checkpoint or a safetensors with SAT names
    (alpha 1, SAT's default)."""
    path = Path(path).expanduser()
    folder = transformer_dir(path) if path.is_dir() else None
    if folder is not None:
        ckpt_path, alpha = checkpoint_file(folder), lora_alpha(read_yaml(path))
        state = state_dict_of(load_pickle(ckpt_path, trust_pickle), ckpt_path)
    elif path.suffix == ".pt":
        ckpt_path, alpha = path, 1.0
        state = state_dict_of(load_pickle(path, trust_pickle), path)
    elif path.suffix == ".safetensors" and path.is_file() and _is_sat_safetensors(path):
        ckpt_path, alpha = path, 1.0
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    else:
        return read_lora(path)
    return sat.lora_layers(state, alpha, str(ckpt_path))
