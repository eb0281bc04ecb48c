"""A diffusers-layout CogVideoX folder as a `Checkpoint`: its configs, its safetensors (read when the
assembler asks) renamed onto cvfast's modules, and its T5 text encoder.

    FOLDER/model_index.json
           transformer/, vae/        config.json + safetensors (one file, or shards with *.index.json)
           text_encoder/, tokenizer/ transformers' T5EncoderModel and its tokenizer
           scheduler/scheduler_config.json

An unknown, missing or mis-shaped tensor is an error naming the file, the key and the expected shape.
Only safetensors are read here (pickle checkpoints are the SAT reader's business, with its own
safety rules).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.errors import CVFastInputError, WeightError
from ..models.config import TransformerConfig, VAEConfig, generation_defaults
from ..models.text_encoder import TextEncoder
from ..sampler.schedulers import SchedulerConfig
from .checkpoint import Checkpoint, Tensors
from .hub import read_json


def safetensors_files(component_dir: Path) -> list[Path]:
    """The weight files of one component folder: the shards an `*.index.json` names, else the single
    `*.safetensors` file."""
    indexes = sorted(component_dir.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted({component_dir / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise WeightError(f"{indexes[0]} names shards that are not there: {missing}")
        return files
    files = sorted(component_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in component_dir.glob("*.bin")) + sorted(p.name for p in component_dir.glob("*.pt"))
        hint = f" (found {pickles}: pickle checkpoints are not read here, convert them to safetensors)" if pickles else ""
        raise WeightError(f"no *.safetensors weights in {component_dir}{hint}")
    if len(files) > 1:
        raise WeightError(f"several *.safetensors in {component_dir} and no index json: {[f.name for f in files]}")
    return files


def read_tensors(component_dir: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """All tensors of a component, each with the file it came from (for error messages)."""
    out: dict[str, tuple[torch.Tensor, Path]] = {}
    for path in safetensors_files(component_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (no __iter__)
                    out[key] = (f.get_tensor(key), path)
        except (OSError, SafetensorError) as exc:
            raise WeightError(f"{path} cannot be read as safetensors ({exc}): a truncated or damaged file?") from None
    return out


# diffusers CogVideoXTransformer3DModel name -> cvfast CogVideoXTransformer name.
_TRANSFORMER_RENAMES = [
    (r"patch_embed\.proj\.(weight|bias)", r"patch_proj.\1"),
    (r"patch_embed\.text_proj\.(weight|bias)", r"text_proj.\1"),
    (r"patch_embed\.pos_embedding", r"pos_embedding"),
    (r"time_embedding\.linear_([12])\.(weight|bias)", r"time_embed.fc\1.\2"),
    (r"ofs_embedding\.linear_([12])\.(weight|bias)", r"ofs_embed.fc\1.\2"),
    (r"transformer_blocks\.(\d+)\.norm([12])\.linear\.(weight|bias)", r"blocks.\1.mod\2.\3"),
    (r"transformer_blocks\.(\d+)\.norm([12])\.norm\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"transformer_blocks\.(\d+)\.attn1\.norm_([qk])\.(weight|bias)", r"blocks.\1.\2_norm.\3"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.attn_out.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ff1.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"blocks.\1.ff2.\2"),
    (r"norm_final\.(weight|bias)", r"norm_final.\1"),
    (r"norm_out\.linear\.(weight|bias)", r"out_mod.\1"),
    (r"norm_out\.norm\.(weight|bias)", r"out_norm.\1"),
    (r"proj_out\.(weight|bias)", r"proj_out.\1"),
]
QKV_KEY = re.compile(r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)")


def diffusers_name(key: str) -> str:
    """The diffusers name of a cvfast transformer tensor (the inverse of `cvfast_name`, for messages
    that must name what the user's file holds); `key` itself when none maps to it."""
    qkv = re.fullmatch(r"blocks\.(\d+)\.qkv\.(weight|bias)", key)
    if qkv:
        return f"transformer_blocks.{qkv[1]}.attn1.to_q/to_k/to_v.{qkv[2]}"
    for pattern, target in _TRANSFORMER_RENAMES:
        # Each rename run backwards: the target, escaped but with its group references (\1, \2, ...)
        # turned into groups, matches the cvfast name; the pattern, with each of its groups turned into
        # a slot, takes the matched parts. Running the result forwards again checks it.
        backwards = re.sub(r"\\\d", "(.+?)", re.escape(target).replace("\\\\", "\\"))
        found = re.fullmatch(backwards, key)
        if found:
            slots = re.sub(r"\((?:[^()]|\([^()]*\))*\)", "{}", pattern).replace("\\.", ".")
            candidate = slots.format(*found.groups())
            if cvfast_name(candidate) == key:
                return candidate
    return key


def cvfast_name(key: str) -> str | None:
    """cvfast's name for a diffusers transformer tensor other than to_q/to_k/to_v (None: unknown)."""
    for pattern, target in _TRANSFORMER_RENAMES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def transformer_state_dict(tensors: dict[str, tuple[torch.Tensor, Path]]) -> dict[str, tuple[torch.Tensor, str]]:
    """Rename diffusers transformer tensors to cvfast's, fusing to_q/to_k/to_v into one `qkv`
    projection and flattening the 2D patch convolution into a linear layer.
    Returns {cvfast key: (tensor, 'file:key' provenance)}; unknown keys raise."""
    out, qkv_parts, unknown = {}, {}, []
    for key, (tensor, path) in tensors.items():
        where = f"{path}:{key}"
        match = QKV_KEY.fullmatch(key)
        if match:
            qkv_parts.setdefault((match[1], match[3]), {})[match[2]] = (tensor, where)
            continue
        name = cvfast_name(key)
        if name is None:
            unknown.append(where)
            continue
        if name == "patch_proj.weight" and tensor.dim() == 4:  # Conv2d(stride=p) == Linear over patches
            tensor = tensor.reshape(tensor.shape[0], -1)
        out[name] = (tensor, where)
    if unknown:
        raise WeightError(f"unknown transformer tensors (not part of any CogVideoX variant): {unknown[:10]}"
                          + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    for (layer, kind), parts in qkv_parts.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            where = next(iter(parts.values()))[1]
            raise WeightError(f"block {layer} has no to_{'/to_'.join(missing)}.{kind} next to {where}")
        out[f"blocks.{layer}.qkv.{kind}"] = (torch.cat([parts[p][0] for p in "qkv"]), parts["q"][1])
    return out


def to_diffusers_state_dict(ours: dict[str, torch.Tensor], target_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The inverse of `transformer_state_dict`: cvfast tensors under diffusers' names, for the
    diffusers model whose `state_dict()` shapes are `target_shapes` (views, no copies)."""
    out = {}
    for key, shape in target_shapes.items():
        match = QKV_KEY.fullmatch(key)
        if match:
            out[key] = ours[f"blocks.{match[1]}.qkv.{match[3]}"].chunk(3)["qkv".index(match[2])]
        else:
            out[key] = ours[cvfast_name(key)].reshape(shape)
    return out


def text_encoder_loader(folder: Path):
    """(device, dtype) -> the folder's T5 encoder and tokenizer (transformers), on device in dtype."""
    def load(device: torch.device, dtype: torch.dtype) -> TextEncoder:
        from transformers import AutoTokenizer, T5EncoderModel
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        model = T5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype, use_safetensors=True)
        return TextEncoder(tokenizer, model.to(device).eval().requires_grad_(False))
    return load


def open_folder(folder: Path, check: Callable[[TransformerConfig], None], name: str | None = None, *,
                transformer_weights: bool = True) -> Checkpoint:
    """The Checkpoint of a diffusers-layout folder: configs read now (`check` sees the transformer's
    first), weights when the assembler asks. transformer_weights=False: the transformer's config only,
    for a transformer that runs elsewhere (a TensorRT engine)."""
    read_json(folder / "model_index.json")
    transformer = read_config(folder / "transformer" / "config.json", TransformerConfig)
    check(transformer)
    vae = read_config(folder / "vae" / "config.json", VAEConfig)
    scheduler = read_config(folder / "scheduler" / "scheduler_config.json", SchedulerConfig, scheduler_dict(folder))

    def vae_tensors() -> Tensors:
        return {key: (tensor, f"{path}:{key}") for key, (tensor, path) in read_tensors(folder / "vae").items()}
    return Checkpoint(
        name=name or str(folder), transformer=transformer, vae=vae, scheduler=scheduler,
        transformer_tensors=(lambda: transformer_state_dict(read_tensors(folder / "transformer")))
        if transformer_weights else None,
        vae_tensors=vae_tensors, text_encoder=text_encoder_loader(folder),
        defaults=generation_defaults(transformer, vae), transformer_names=diffusers_name)


def read_config(path: Path, cls, data: dict | None = None):
    """`cls.from_dict` of a config file (or of `data`, read from it); what it says that cvfast cannot
    take is an input error naming the file."""
    try:
        return cls.from_dict(read_json(path) if data is None else data)
    except (ValueError, TypeError) as exc:
        raise CVFastInputError(f"{path}: {exc}") from None


def scheduler_dict(folder: Path) -> dict:
    """scheduler/scheduler_config.json, with the scheduler class model_index.json names when the file
    lacks one (as diffusers' loader takes it)."""
    data = read_json(folder / "scheduler" / "scheduler_config.json")
    named = read_json(folder / "model_index.json").get("scheduler")
    if "_class_name" not in data and isinstance(named, list) and named:
        data["_class_name"] = named[-1]
    return data
