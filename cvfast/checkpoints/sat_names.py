"""SAT (CogVideo's SwissArmyTransformer engine) tensor names and configs, mapped onto diffusers'.

A SAT checkpoint is translated to diffusers' names once; from there the diffusers loader
(`diffusers.transformer_state_dict`) takes over, so there is one path from names to cvfast modules.
The name facts come from the SAT model (`sat/dit_video_concat.py`, `sat/vae_modules/cp_enc_dec.py`,
SwissArmyTransformer's `lora2.LoraMixin`) and diffusers' `convert_cogvideox_to_diffusers.py`:

- each block's fused `attention.query_key_value` is q, k, v stacked by rows;
- each block's adaLN `adaLN_modulations.<i>.1` projects to 12 chunks: (shift, scale, gate) of the
  attention, then of the MLP, for the video stream, then the same six for the text stream. diffusers'
  `norm1.linear` holds the attention's video+text chunks (0-2, 6-8), `norm2.linear` the MLP's (3-5, 9-11);
- a layer wrapped for LoRA keeps its base weight as `<layer>.original.weight` next to
  `<layer>.matrix_A.<p>` (r, in) and `<layer>.matrix_B.<p>` (out/partitions, r): 3 partitions (q, k, v)
  for `query_key_value`, 1 for `dense`, merged as W += (lora_alpha / r) * B @ A per partition;
- the VAE names its decoder's up blocks in the opposite order to diffusers.

Keys that carry no weight are dropped by the explicit lists below; any other key the tables do not
know is an error that lists them.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..core.errors import LoRAError, WeightError

SAT_PREFIX = "model.diffusion_model."

# Keys of a SAT engine checkpoint that hold no weight of the denoiser; each with why it goes.
DROPPED_TRANSFORMER_KEYS: list[tuple[str, str]] = [
    (r"model\.diffusion_model\.mixins\.pos_embed\.freqs_(sin|cos)", "precomputed RoPE table"),
    (r"model\.diffusion_model\.transformer\.(word|position)_embeddings\.weight",
     "SAT's placeholder token/position embeddings (vocab_size 1), replaced by the patch and position mixins"),
    (r"conditioner\..+", "copy of the T5 text encoder (the text encoder comes from the base folder)"),
    (r"first_stage_model\..+", "copy of the VAE (the VAE comes from vae/3d-vae.pt)"),
    (r"(loss_fn|denoiser)\..+", "training loss and denoiser buffers"),
]
# The 3D sincos table of 2B is precomputed, not learned; 5B-I2V's table at the same key is a weight.
SINCOS_TABLE_KEY = (r"model\.diffusion_model\.mixins\.pos_embed\.pos_embedding", "precomputed 3D sincos table")
DROPPED_VAE_KEYS: list[tuple[str, str]] = [(r"loss\..+", "the VAE's training loss (discriminator, LPIPS)")]

_LAYER = r"transformer\.layers\.(\d+)\."
# SAT name (after SAT_PREFIX) -> diffusers CogVideoXTransformer3DModel name.
_TRANSFORMER_RENAMES = [
    (r"time_embed\.0\.(weight|bias)", r"time_embedding.linear_1.\1"),
    (r"time_embed\.2\.(weight|bias)", r"time_embedding.linear_2.\1"),
    (r"ofs_embed\.0\.(weight|bias)", r"ofs_embedding.linear_1.\1"),
    (r"ofs_embed\.2\.(weight|bias)", r"ofs_embedding.linear_2.\1"),
    (r"mixins\.patch_embed\.(proj|text_proj)\.(weight|bias)", r"patch_embed.\1.\2"),
    (_LAYER + r"input_layernorm\.(weight|bias)", r"transformer_blocks.\1.norm1.norm.\2"),
    (_LAYER + r"post_attention_layernorm\.(weight|bias)", r"transformer_blocks.\1.norm2.norm.\2"),
    (_LAYER + r"attention\.dense(?:\.original)?\.(weight|bias)", r"transformer_blocks.\1.attn1.to_out.0.\2"),
    (_LAYER + r"mlp\.dense_h_to_4h\.(weight|bias)", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (_LAYER + r"mlp\.dense_4h_to_h\.(weight|bias)", r"transformer_blocks.\1.ff.net.2.\2"),
    (r"transformer\.final_layernorm\.(weight|bias)", r"norm_final.\1"),
    (r"mixins\.adaln_layer\.query_layernorm_list\.(\d+)\.(weight|bias)", r"transformer_blocks.\1.attn1.norm_q.\2"),
    (r"mixins\.adaln_layer\.key_layernorm_list\.(\d+)\.(weight|bias)", r"transformer_blocks.\1.attn1.norm_k.\2"),
    (r"mixins\.final_layer\.norm_final\.(weight|bias)", r"norm_out.norm.\1"),
    (r"mixins\.final_layer\.linear\.(weight|bias)", r"proj_out.\1"),
    (r"mixins\.final_layer\.adaLN_modulation\.1\.(weight|bias)", r"norm_out.linear.\1"),
]
_LEARNED_POSITIONS = (r"mixins\.pos_embed\.pos_embedding", "patch_embed.pos_embedding")
_QKV = re.compile(_LAYER + r"attention\.query_key_value(?:\.original)?\.(weight|bias)")
_ADALN = re.compile(r"mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)")
# SAT LoRA tensors: <layer>.matrix_A.<partition> / <layer>.matrix_B.<partition>.
LORA_KEY = re.compile(r"(?:model\.diffusion_model\.)?(?P<layer>.+)\.matrix_(?P<ab>[AB])\.(?P<part>\d+)")
_LORA_TARGETS = {"query_key_value": ["to_q", "to_k", "to_v"], "dense": ["to_out.0"]}
_LORA_LAYER = re.compile(_LAYER + r"attention\.(query_key_value|dense)")


def _dropped(key: str, table: list[tuple[str, str]]) -> bool:
    return any(re.fullmatch(pattern, key) for pattern, _ in table)


def _listed(keys: list[str]) -> str:
    return f"{keys[:10]}" + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")


def _split_adaln(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAT's 12-chunk adaLN projection -> (diffusers norm1.linear, norm2.linear)."""
    chunks = tensor.chunk(12, dim=0)
    return torch.cat(chunks[0:3] + chunks[6:9]), torch.cat(chunks[3:6] + chunks[9:12])


def _rename(key: str, renames: list[tuple[str, str]]) -> str | None:
    for pattern, target in renames:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def transformer_to_diffusers(state: dict[str, torch.Tensor], learned_positions: bool,
                             source: str) -> dict[str, torch.Tensor]:
    """The denoiser tensors of a SAT engine state dict under diffusers' names. LoRA matrices are
    left to `lora_layers`; keys in the drop lists go; any other unknown key raises, listing them."""
    renames = _TRANSFORMER_RENAMES + ([_LEARNED_POSITIONS] if learned_positions else [])
    dropped = DROPPED_TRANSFORMER_KEYS + ([] if learned_positions else [SINCOS_TABLE_KEY])
    out, unknown = {}, []
    for key, tensor in state.items():
        if LORA_KEY.fullmatch(key) or _dropped(key, dropped):
            continue
        name = key[len(SAT_PREFIX):] if key.startswith(SAT_PREFIX) else None
        qkv = _QKV.fullmatch(name or "")
        adaln = _ADALN.fullmatch(name or "")
        if qkv:
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                out[f"transformer_blocks.{qkv[1]}.attn1.to_{part}.{qkv[2]}"] = chunk
        elif adaln:
            norm1, norm2 = _split_adaln(tensor)
            out[f"transformer_blocks.{adaln[1]}.norm1.linear.{adaln[2]}"] = norm1
            out[f"transformer_blocks.{adaln[1]}.norm2.linear.{adaln[2]}"] = norm2
        elif name is not None and (target := _rename(name, renames)) is not None:
            out[target] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise WeightError(f"{source}: SAT tensors that are no part of a CogVideoX denoiser and not in the "
                          f"drop list: {_listed(unknown)}")
    return out


def _vae_name(key: str, up_blocks: int) -> str | None:
    """diffusers' AutoencoderKLCogVideoX name of a SAT VAE tensor (None: unknown)."""
    def resnet(rest: str) -> str:
        return re.sub(r"^nin_shortcut\.", "conv_shortcut.", rest)

    patterns: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(.+)", lambda m: m[0]),
        (r"(encoder|decoder)\.mid\.block_([12])\.(.+)",
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{resnet(m[3])}"),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)",
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{resnet(m[3])}"),
        (r"encoder\.down\.(\d+)\.downsample\.(.+)", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.{m[2]}"),
        # SAT counts up blocks from the lowest resolution's end; diffusers from the latent's.
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)",
         lambda m: f"decoder.up_blocks.{up_blocks - 1 - int(m[1])}.resnets.{m[2]}.{resnet(m[3])}"),
        (r"decoder\.up\.(\d+)\.upsample\.(.+)",
         lambda m: f"decoder.up_blocks.{up_blocks - 1 - int(m[1])}.upsamplers.0.{m[2]}"),
    ]
    for pattern, build in patterns:
        match = re.fullmatch(pattern, key)
        if match:
            return build(match)
    return None


def vae_to_diffusers(state: dict[str, torch.Tensor], up_blocks: int, source: str) -> dict[str, torch.Tensor]:
    """A SAT `3d-vae.pt` state dict under diffusers' names (`up_blocks`: how many the decoder has)."""
    out, unknown = {}, []
    for key, tensor in state.items():
        if _dropped(key, DROPPED_VAE_KEYS):
            continue
        name = _vae_name(key, up_blocks)
        if name is None:
            unknown.append(key)
        else:
            out[name] = tensor
    if unknown:
        raise WeightError(f"{source}: SAT VAE tensors that are no part of the CogVideoX VAE and not in the drop "
                          f"list: {_listed(unknown)}")
    return out


def has_lora(state: dict) -> bool:
    return any(LORA_KEY.fullmatch(k) for k in state)


def lora_layers(state: dict[str, torch.Tensor], alpha: float, source: str) -> dict[str, dict]:
    """SAT LoRA matrices as {diffusers layer: {"A": (r, in), "B": (out, r), "alpha": alpha}}, the form
    `lora.lora_deltas` merges (a q/k/v partition lands in its rows of the fused projection there).
    Matrices outside a block's attention, partitions that do not fit the layer, incomplete pairs and
    ranks that disagree raise, listing them."""
    parts: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in state.items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            continue  # base weights of the same checkpoint
        layer = _LORA_LAYER.fullmatch(match["layer"])
        if layer is None or int(match["part"]) >= len(_LORA_TARGETS[layer[2]]):
            foreign.append(key)
            continue
        parts.setdefault((match["layer"], int(match["part"])), {})[match["ab"]] = tensor
    if foreign:
        raise LoRAError(f"{source}: LoRA matrices that are not on a CogVideoX attention layer "
                          f"(query_key_value partitions 0-2, dense partition 0): {_listed(foreign)}")
    if not parts:
        raise LoRAError(f"{source}: no SAT LoRA tensors (<layer>.matrix_A.<i> / <layer>.matrix_B.<i>) found")
    layers, broken = {}, []
    for (sat_layer, part), pair in sorted(parts.items()):
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
            shapes = {ab: tuple(t.shape) for ab, t in pair.items()}
            broken.append(f"{sat_layer} partition {part}: {shapes}")
            continue
        match = _LORA_LAYER.fullmatch(sat_layer)
        target = _LORA_TARGETS[match[2]][part]
        layers[f"transformer_blocks.{match[1]}.attn1.{target}"] = {
            "A": pair["A"], "B": pair["B"], "alpha": alpha, "label": f"{sat_layer} partition {part} ({target})"}
    if broken:
        raise LoRAError(f"{source}: LoRA pairs with a missing matrix or ranks that disagree "
                          f"(matrix_A is (r, in), matrix_B is (out, r)): {_listed(broken)}")
    return layers


def transformer_config(network: dict) -> dict:
    """diffusers' transformer config of a SAT `model.network_config.params` yaml section.

    Fields SAT does not name (flip_sin_to_cos, freq_shift, activations, norm_eps, attention_bias) keep
    the values every CogVideoX release uses (cvfast's TransformerConfig defaults)."""
    modules = network.get("modules", {})
    pos = modules.get("pos_embed_config", {})
    pos_params = pos.get("params", {})
    patch = network["patch_size"]
    spatial, temporal = (patch[1], patch[0]) if isinstance(patch, (list, tuple)) else (patch, None)
    if isinstance(patch, (list, tuple)) and patch[1] != patch[2]:
        raise WeightError(f"patch_size={patch}: CogVideoX patches are square (height == width)")
    rotary = pos.get("target", "").endswith("Rotary3DPositionEmbeddingMixin")
    # The interpolation scales sit in the position mixin's params or the DiffusionTransformer's
    # (which hands them to the mixin); SAT's default is 1.0. SAT scales rows and columns separately,
    # diffusers has one spatial scale.
    def interpolation(axis: str) -> float:
        return float(pos_params.get(f"{axis}_interpolation", network.get(f"{axis}_interpolation", 1.0)))

    spatial_scale = interpolation("height")
    if interpolation("width") != spatial_scale:
        raise WeightError(f"height_interpolation {spatial_scale} and width_interpolation {interpolation('width')} "
                          "differ, which no CogVideoX model (nor diffusers) has")
    hidden, heads = network["hidden_size"], network["num_attention_heads"]
    return {
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": network["in_channels"],
        "out_channels": network["out_channels"],
        "time_embed_dim": network.get("time_embed_dim", hidden),
        "ofs_embed_dim": network.get("ofs_embed_dim"),
        "text_embed_dim": modules.get("patch_embed_config", {}).get("params", {}).get("text_hidden_size", 4096),
        "num_layers": network["num_layers"],
        "sample_width": network["latent_width"],
        "sample_height": network["latent_height"],
        "sample_frames": network["num_frames"],
        "patch_size": spatial,
        "patch_size_t": temporal if temporal and temporal > 1 else None,
        "temporal_compression_ratio": network["time_compressed_rate"],
        "max_text_seq_length": pos_params.get("text_length", 226),
        "norm_elementwise_affine": network.get("elementwise_affine", True),
        "spatial_interpolation_scale": spatial_scale,
        "temporal_interpolation_scale": interpolation("time"),
        "use_rotary_positional_embeddings": rotary,
        "use_learned_positional_embeddings": bool(pos_params.get("learnable_pos_embed", False)),
        # diffusers' temporal-patch embedding ignores patch_bias; the 1.5 releases say False.
        "patch_bias": not (temporal and temporal > 1),
    }
