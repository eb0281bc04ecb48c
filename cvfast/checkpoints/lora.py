"""LoRA adapters, read in every supported format and merged into the weights at load time.

Formats: diffusers/PEFT safetensors (`read_lora`), and SAT's matrix_A/matrix_B adapters in a SAT
directory, its .pt or a safetensors with SAT names (`read_adapter` takes them all).

A LoRA on a linear layer W (out, in) adds scale * (alpha / r) * B @ A with A (r, in) and B (out, r).
cvfast merges that product into W once, so every backend runs at full speed with no extra matmuls;
the original tensors of the layers it touched are kept (on the CPU) so that unloading restores them
bit for bit. diffusers names the layers of its own transformer; they are renamed with the same
table that loads the base weights (q/k/v LoRAs land in their rows of the fused qkv projection).

alpha comes from, in this order: a per-layer `<layer>.alpha` tensor (kohya-style files), the
`lora_adapter_metadata` JSON diffusers writes into the safetensors header (`transformer.lora_alpha`),
else alpha = r (a scaling of 1, what diffusers assumes for a file without either).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.errors import LoRAError, bad_arg
from ..core.checks import is_number
from . import sat_names
from .diffusers import QKV_KEY, cvfast_name
from .hub import download, is_hub_id
from .sat import checkpoint_file, load_pickle, lora_alpha, read_yaml, state_dict_of, transformer_dir

_LORA_KEY = re.compile(r"(?P<layer>.+)\.lora_(?P<ab>[AB])\.weight")
# The top-level modules of diffusers' CogVideoXTransformer3DModel: keys without the "transformer."
# prefix (a bare PEFT state dict) must start with one of them.
_TRANSFORMER_ROOTS = ("transformer_blocks.", "patch_embed.", "time_embedding.", "ofs_embedding.", "norm_final.",
                      "norm_out.", "proj_out.")


def _alpha_from_metadata(metadata: dict) -> tuple[float | None, list[str]]:
    """(the global lora_alpha, the per-layer patterns cvfast does not take) from diffusers' header."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None, []
    meta = json.loads(raw)
    alpha = meta.get("transformer.lora_alpha", meta.get("lora_alpha"))
    patterns = [k for k in ("transformer.alpha_pattern", "transformer.rank_pattern", "alpha_pattern", "rank_pattern")
                if meta.get(k)]
    return alpha, patterns


# The file name diffusers' save_lora_weights writes, and load_lora_weights looks for in a folder.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def is_lora_hub_id(source) -> bool:
    """Whether a LoRA source that is not a local path names a hub repo: 'org/name', and not a file name
    (a mistyped 'loras/x.safetensors' is a missing file, not a repo)."""
    return is_hub_id(source) and Path(str(source)).suffix not in (".safetensors", ".pt", ".bin")


def lora_path(source, weight_name: str | None = None) -> Path:
    """The local path of a LoRA: `source` as it is, or a hub id fetched (only `weight_name`, else its
    safetensors); `weight_name` picks that file inside a folder or repo, as diffusers' argument does."""
    path = Path(str(source)).expanduser()
    if not path.exists() and is_lora_hub_id(source):
        path = download(str(source), [weight_name] if weight_name else ["*.safetensors"], argument="lora")
    if weight_name is None:
        return path
    if not path.is_dir():
        raise bad_arg("weight_name", weight_name, f"None when the LoRA is a file ({path}); a file name inside a "
                      "LoRA folder or hub repo otherwise")
    if not (path / weight_name).is_file():
        raise bad_arg("weight_name", weight_name, f"a file in {path}: {sorted(f.name for f in path.iterdir())}")
    return path / weight_name


def read_lora(path: str | Path) -> dict[str, dict]:
    """{diffusers layer name: {"A": (r, in), "B": (out, r), "alpha": float}} of a transformer LoRA file
    (a folder: its one safetensors, or diffusers' `pytorch_lora_weights.safetensors` among several)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1 and (path / DIFFUSERS_WEIGHT_NAME).is_file():
            files = [path / DIFFUSERS_WEIGHT_NAME]
        if len(files) != 1:
            raise LoRAError(f"{path}: expected one *.safetensors LoRA file, found {[f.name for f in files]} "
                            "(weight_name= picks one)")
        path = files[0]
    if path.suffix != ".safetensors":
        raise LoRAError(f"{path}: LoRA files are read as safetensors only (pickles are never loaded here)")
    with safe_open(str(path), framework="pt") as f:
        alpha, patterns = _alpha_from_metadata(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if patterns:
        raise LoRAError(f"{path}: per-layer alpha/rank patterns ({patterns}) are not supported yet")
    layers, foreign, unknown = {}, [], []
    alphas = {k[:-len(".alpha")]: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):
            continue
        name = key.removeprefix("base_model.model.")
        if name.startswith("transformer."):
            name = name[len("transformer."):]
        elif not name.startswith(_TRANSFORMER_ROOTS):
            foreign.append(key)  # e.g. "text_encoder.<...>": an adapter for another component
            continue
        match = _LORA_KEY.fullmatch(name)
        if match is None:
            unknown.append(key)
            continue
        layers.setdefault(match["layer"], {})[match["ab"]] = tensor
    if foreign or unknown:
        raise LoRAError(f"{path}: tensors that are not a transformer LoRA: {(foreign + unknown)[:8]}")
    for layer, parts in layers.items():
        if set(parts) != {"A", "B"}:
            raise LoRAError(f"{path}: layer {layer} has lora_{'/lora_'.join(sorted(parts))} only")
        rank = parts["A"].shape[0]
        if parts["B"].shape[1] != rank:
            raise LoRAError(f"{path}: layer {layer}: lora_A rank {rank} and lora_B rank {parts['B'].shape[1]} disagree")
        parts["alpha"] = alphas.get(layer, alphas.get(f"transformer.{layer}", alpha if alpha is not None else rank))
    return layers


def lora_deltas(layers: dict[str, dict], params: dict[str, torch.Tensor], scale: float,
                source: str) -> dict[str, list[tuple[slice, torch.Tensor]]]:
    """{cvfast parameter: [(rows it changes, delta float32), ...]} for the transformer whose
    parameters are `params`; layers that match nothing, or whose shape disagrees, raise listing them
    (by their "label" when the file named them otherwise, e.g. SAT's)."""
    out, unmatched = {}, []
    for layer, parts in layers.items():
        delta = scale * (parts["alpha"] / parts["A"].shape[0]) * (parts["B"].float() @ parts["A"].float())
        qkv = QKV_KEY.fullmatch(f"{layer}.weight")
        if qkv:
            name = f"blocks.{qkv[1]}.qkv.weight"
            rows = params[name].shape[0] // 3 if name in params else 0
            index = "qkv".index(qkv[2])
            target = (name, slice(index * rows, (index + 1) * rows))
        else:
            name = cvfast_name(f"{layer}.weight")
            target = (name, slice(None)) if name in params else None
        if target is None or params[target[0]][target[1]].shape != delta.shape:
            have = tuple(params[target[0]][target[1]].shape) if target else "no such layer"
            unmatched.append(f"{parts.get('label', layer)} (delta {tuple(delta.shape)}, model: {have})")
            continue
        out.setdefault(target[0], []).append((target[1], delta))
    if unmatched:
        raise LoRAError(f"{source}: LoRA layers that match no layer of this {len(params)}-tensor transformer: "
                        f"{unmatched[:8]}")
    return out


def is_sat_safetensors(path: Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return any(sat_names.LORA_KEY.fullmatch(k) for k in f.keys())  # noqa: SIM118 (no __iter__)


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
    elif path.suffix == ".safetensors" and path.is_file() and is_sat_safetensors(path):
        ckpt_path, alpha = path, 1.0
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    else:
        return read_lora(path)
    return sat_names.lora_layers(state, alpha, str(ckpt_path))


@torch.no_grad()
def add_deltas(weights: dict[str, torch.Tensor], deltas: dict[str, list[tuple[slice, torch.Tensor]]]) -> None:
    """The one merge: W[rows] += delta for every (rows, delta) of `lora_deltas`, in place, in W's dtype."""
    for name, parts in deltas.items():
        weight = weights[name]
        for rows, delta in parts:
            weight[rows] += delta.to(weight.device, weight.dtype)


@dataclass
class Adapter:
    """One loaded LoRA: its layers (on the CPU), where it came from, and its weight in the merge
    (None: loaded but not active)."""
    layers: dict[str, dict]
    source: str
    scale: float | None


class LoRAs:
    """The LoRAs loaded into one transformer, by adapter name, and the base tensors of the layers they
    changed (kept on the CPU). The weights are always base + the sum of scale x delta over the active
    adapters, merged in place: changing which adapters are active (`set_active`) or removing one
    (`unload`) restores the base tensors bit for bit, then merges the active ones again."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.backup: dict[str, torch.Tensor] = {}
        self.adapters: dict[str, Adapter] = {}

    def load(self, path, scale: float, trust_pickle: bool = False, *, adapter_name: str | None = None,
             weight_name: str | None = None) -> list[str]:
        """Read the adapter at `path` (`read_adapter`'s formats, a hub id, `weight_name` in a folder)
        and merge it with `scale` under `adapter_name` (default `default_<n>`, as diffusers names them);
        the parameters it changed."""
        if not is_number(scale):
            raise bad_arg("scale", scale, "a finite number")
        name = self.new_name(adapter_name)
        return self.merge(read_adapter(lora_path(path, weight_name), trust_pickle), scale, str(path), name)

    def new_name(self, adapter_name: str | None) -> str:
        if adapter_name is None:
            return next(f"default_{i}" for i in range(len(self.adapters) + 1) if f"default_{i}" not in self.adapters)
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name in self.adapters:
            raise bad_arg("adapter_name", adapter_name, f"a new non-empty name (loaded: {sorted(self.adapters)})")
        return adapter_name

    def merge(self, layers: dict[str, dict], scale: float, source: str, name: str) -> list[str]:
        """Merge LoRA layers ({diffusers layer: {"A", "B", "alpha"}}, as `read_adapter` returns them)
        as adapter `name`; every layer is checked before any weight changes."""
        params = dict(self.transformer.named_parameters())
        deltas = lora_deltas(layers, params, float(scale), source)
        for key in deltas:
            self.backup.setdefault(key, params[key].detach().to("cpu", copy=True))
        add_deltas(params, deltas)
        self.adapters[name] = Adapter(layers, source, float(scale))
        return sorted(deltas)

    def set_active(self, scales: dict[str, float]) -> None:
        """Make exactly the adapters in `scales` active, each with its scale (the others stay loaded)."""
        unknown = sorted(set(scales) - set(self.adapters))
        if unknown:
            raise bad_arg("adapter_names", unknown, f"names of loaded adapters: {sorted(self.adapters)}")
        bad = {name: scale for name, scale in scales.items() if not is_number(scale)}
        if bad:
            raise bad_arg("adapter_weights", bad, "finite numbers")
        for name, adapter in self.adapters.items():
            adapter.scale = float(scales[name]) if name in scales else None
        self.remerge()

    def unload(self, name: str | None = None) -> None:
        """Remove adapter `name` (None: all of them) and put the weights back to base + the others."""
        if name is not None and name not in self.adapters:
            raise bad_arg("adapter_name", name, f"a loaded adapter: {sorted(self.adapters)}")
        for key in [name] if name is not None else list(self.adapters):
            del self.adapters[key]
        self.remerge()

    def active(self) -> dict[str, float]:
        return {name: a.scale for name, a in self.adapters.items() if a.scale is not None}

    @torch.no_grad()
    def remerge(self) -> None:
        """Base tensors back (bit for bit), then every active adapter merged again."""
        params = dict(self.transformer.named_parameters())
        for key, original in self.backup.items():
            params[key].copy_(original)
        for adapter in self.adapters.values():
            if adapter.scale is not None:
                add_deltas(params, lora_deltas(adapter.layers, params, adapter.scale, adapter.source))
        if not self.adapters:
            self.backup.clear()
