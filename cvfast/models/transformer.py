"""CogVideoX denoiser: patch embedding, adaLN-zero blocks over joint text+video tokens, unpatchify.

Covers every variant through `TransformerConfig`: 3D sincos positions (2B), 3D RoPE on the video
tokens (5B, and 1.5 with its integer grid), learned positions (5B-I2V), temporal patching without
patch bias (1.5), and the ofs embedding (1.5-I2V). The heavy math goes through `cvfast.ops`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import OpSet
from .config import TransformerConfig
from .embeddings import rope_3d, sincos_3d, timestep_features


class TimestepMLP(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, flip_sin_to_cos: bool, shift: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim)
        self.flip_sin_to_cos, self.shift = flip_sin_to_cos, shift

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t: (batch,) -> (batch, out_dim)."""
        feats = timestep_features(t, self.fc1.in_features, self.flip_sin_to_cos, self.shift).to(dtype)
        return self.fc2(F.silu(self.fc1(feats)))


def _segments(modulation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's (B, 6D) modulation -> shift, scale, gate, each (B, 2, D) as [text, video]
    (the Linear's output order is video shift, scale, gate, then text shift, scale, gate)."""
    shift, scale, gate, t_shift, t_scale, t_gate = modulation.unsqueeze(1).chunk(6, dim=2)
    return torch.cat((t_shift, shift), 1), torch.cat((t_scale, scale), 1), torch.cat((t_gate, gate), 1)


class Block(nn.Module):
    """One adaLN-zero block over the joint [text; video] residual stream; text and video rows get
    their own modulation and attend jointly."""

    def __init__(self, cfg: TransformerConfig, ops: OpSet):
        super().__init__()
        dim, self.heads = cfg.inner_dim, cfg.num_attention_heads
        self.ops, self.eps = ops, cfg.norm_eps
        affine = cfg.norm_elementwise_affine
        self.mod1 = nn.Linear(cfg.time_embed_dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, cfg.norm_eps, affine)
        self.qkv = nn.Linear(dim, 3 * dim, bias=cfg.attention_bias)  # q, k, v fused at load time
        self.q_norm = nn.LayerNorm(cfg.attention_head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(cfg.attention_head_dim, eps=1e-6)
        self.attn_out = nn.Linear(dim, dim)
        self.mod2 = nn.Linear(cfg.time_embed_dim, 6 * dim)
        self.norm2 = nn.LayerNorm(dim, cfg.norm_eps, affine)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.ff2 = nn.Linear(4 * dim, dim)

    def forward(self, h: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None, temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None, n_text: int):
        """h: (B, S, D) residual stream, the first n_text rows text; pending: (y, gate) the previous
        block's feed-forward output (B, S, D) and gate (B, 2, D), not yet added to h (so the add
        fuses with this block's first norm), or None; temb: (B, T); rope: cos, sin (S - n_text,
        head_dim) or None. Returns (h, this block's pending feed-forward)."""
        ops = self.ops
        shift1, scale1, gate1 = _segments(self.mod1(F.silu(temb)))
        shift2, scale2, gate2 = _segments(self.mod2(F.silu(temb)))
        # 1. (The previous residual, then) adaLN of text and video rows.
        if pending is None:
            normed = ops.modulate(h, self.norm1.weight, self.norm1.bias, shift1, scale1, n_text, self.eps)
        else:
            h, normed = ops.gated_residual_modulate(h, *pending, self.norm1.weight, self.norm1.bias, shift1, scale1,
                                                    n_text, self.eps)
        # 2. QK LayerNorm, RoPE on the video rows, joint attention, straight from the fused projection.
        rope_cos, rope_sin = rope if rope is not None else (None, None)
        attn = ops.joint_attention(self.qkv(normed), self.heads, self.q_norm.weight, self.q_norm.bias,
                                   self.k_norm.weight, self.k_norm.bias, self.q_norm.eps, rope_cos, rope_sin, n_text)
        # 3. Gated residual fused with the second adaLN, then the feed-forward.
        h, normed = ops.gated_residual_modulate(h, self.attn_out(attn), gate1, self.norm2.weight, self.norm2.bias,
                                                shift2, scale2, n_text, self.eps)
        if isinstance(self.ff1, nn.Linear):
            ff = ops.gelu_mlp(normed, self.ff1.weight, self.ff1.bias, self.ff2.weight, self.ff2.bias)
        else:  # FP8 linears (`cvfast.models.fp8`) run their own matmuls; the GELU between them is the same
            ff = self.ff2(F.gelu(self.ff1(normed), approximate="tanh"))
        return h, (ff, gate2)


class CogVideoXTransformer(nn.Module):
    """The denoiser. Call `position_tables` once per latent shape, then `forward` per step.

    sequence_parallel: when the video tokens are split over ranks (Ulysses,
    `cvfast.runtime.parallel.ulysses.SequenceParallel`), what keeps this rank's tokens after the
    embedding (`scatter`) and gathers every rank's before unpatchify (`gather`); its attention wrapper
    is then part of `ops`."""

    def __init__(self, cfg: TransformerConfig, ops: OpSet | None = None, sequence_parallel=None):
        super().__init__()
        self.cfg, self.ops, self.sequence_parallel = cfg, ops or OpSet(), sequence_parallel
        dim, patch_dim = cfg.inner_dim, cfg.in_channels * cfg.temporal_patch * cfg.patch_size ** 2
        # diffusers' temporal-patch (1.5) embedding is a Linear that always has a bias, whatever
        # `patch_bias` says, and the released 1.5 folders were saved from it.
        self.patch_proj = nn.Linear(patch_dim, dim, bias=cfg.patch_bias or cfg.patch_size_t is not None)
        self.text_proj = nn.Linear(cfg.text_embed_dim, dim)
        if cfg.use_learned_positional_embeddings:
            self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.max_text_seq_length + self._sample_patches(), dim))
        self.time_embed = TimestepMLP(dim, cfg.time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        self.ofs_embed = (TimestepMLP(cfg.ofs_embed_dim, cfg.ofs_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
                          if cfg.ofs_embed_dim else None)
        self.blocks = nn.ModuleList(Block(cfg, self.ops) for _ in range(cfg.num_layers))
        self.norm_final = nn.LayerNorm(dim, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.out_mod = nn.Linear(cfg.time_embed_dim, 2 * dim)
        self.out_norm = nn.LayerNorm(dim, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.proj_out = nn.Linear(dim, patch_dim // cfg.in_channels * cfg.out_channels)

    def _sample_patches(self) -> int:
        cfg = self.cfg
        frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
        return frames // cfg.temporal_patch * (cfg.sample_height // cfg.patch_size) * (cfg.sample_width // cfg.patch_size)

    def position_tables(self, latent_frames: int, latent_h: int, latent_w: int, device) -> dict:
        """Positional inputs for a latent shape, on `device`, N = patch tokens: {'rope': (cos, sin)}
        (N, head_dim) float32 (RoPE runs in fp32), or {'sincos': (N, D)} already in the model's
        dtype (cast once here, not every step). Learned-position models take their table from the
        weights."""
        cfg, p = self.cfg, self.cfg.patch_size
        frames, grid_h, grid_w = latent_frames // cfg.temporal_patch, latent_h // p, latent_w // p
        if cfg.use_rotary_positional_embeddings:
            cos, sin = rope_3d(cfg.attention_head_dim, frames, grid_h, grid_w, cfg.sample_height // p,
                               cfg.sample_width // p, slice_grid=cfg.patch_size_t is not None)
            return {"rope": (cos.to(device), sin.to(device))}
        table = sincos_3d(cfg.inner_dim, frames, grid_h, grid_w, cfg.spatial_interpolation_scale,
                          cfg.temporal_interpolation_scale)
        return {"sincos": table.to(device=device, dtype=self.patch_proj.weight.dtype)}

    def _patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, F, C, H, W) -> (B, F/pt * H/p * W/p, C*pt*p*p), features ordered (C, pt, p, p)."""
        b, f, c, h, w = latents.shape
        p, pt = self.cfg.patch_size, self.cfg.temporal_patch
        x = latents.reshape(b, f // pt, pt, c, h // p, p, w // p, p)
        return x.permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(b, (f // pt) * (h // p) * (w // p), c * pt * p * p)

    def _unpatchify(self, tokens: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        """(B, N, C*pt*p*p) -> (B, F, C, H, W); inverse of `_patchify`."""
        p, pt = self.cfg.patch_size, self.cfg.temporal_patch
        b = tokens.shape[0]
        x = tokens.reshape(b, f // pt, h // p, w // p, -1, pt, p, p)
        return x.permute(0, 1, 5, 4, 2, 6, 3, 7).reshape(b, f, -1, h, w)

    def conditioning(self, timestep: torch.Tensor, dtype: torch.dtype, ofs: torch.Tensor | None = None) -> torch.Tensor:
        """timestep: (B,) (and ofs (B,) for 1.5-I2V) -> the conditioning vector (B, time_embed_dim) in dtype."""
        temb = self.time_embed(timestep, dtype)
        return temb + self.ofs_embed(ofs, dtype) if self.ofs_embed is not None else temb

    def tokens(self, latents: torch.Tensor, text: torch.Tensor, tables: dict) -> torch.Tensor:
        """latents (B, F, C_in, H, W), text (B, L, text_dim) -> the joint stream (B, L + video rows, D),
        text rows first, absolute positions added where the variant has them (video rows: this rank's
        share under sequence parallelism)."""
        cfg = self.cfg
        text_tok = self.text_proj(text)
        video_tok = self.patch_proj(self._patchify(latents))
        if cfg.use_learned_positional_embeddings:
            pos = self.pos_embedding.to(video_tok.dtype)
            text_tok = text_tok + pos[:, :text.shape[1]]
            video_tok = video_tok + pos[:, cfg.max_text_seq_length:]
        elif "sincos" in tables:
            video_tok = video_tok + tables["sincos"]
        if self.sequence_parallel is not None:
            video_tok = self.sequence_parallel.scatter(video_tok)
        return torch.cat((text_tok, video_tok), dim=1)

    def run_blocks(self, stream: torch.Tensor, pending, temb: torch.Tensor, tables: dict, n_text: int,
                   start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Blocks start..stop - 1 (default all) over the joint stream; `pending` as `Block.forward` takes
        and returns it (the last block's feed-forward not yet added: `settle` adds it)."""
        rope = tables.get("rope")
        for block in self.blocks[start:stop]:
            stream, pending = block(stream, pending, temb, rope, n_text)
        return stream, pending

    def settle(self, stream: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor], n_text: int) -> torch.Tensor:
        """The stream with the pending feed-forward added: the blocks' output."""
        return self.ops.gated_residual(stream, *pending, n_text)

    def head(self, stream: torch.Tensor, temb: torch.Tensor, n_text: int, latent_shape: torch.Size) -> torch.Tensor:
        """The blocks' output stream -> the model output (B, F, C_out, H, W) for latents of
        `latent_shape` (B, F, C_in, H, W): final norm, output modulation, projection, unpatchify."""
        cfg = self.cfg
        _, f, _, h, w = latent_shape
        video_tok = self.ops.layer_norm(stream[:, n_text:], self.norm_final.weight, self.norm_final.bias, cfg.norm_eps)
        shift, scale = self.out_mod(F.silu(temb)).unsqueeze(1).chunk(2, dim=2)  # shift first, then scale
        video_tok = self.ops.modulate(video_tok, self.out_norm.weight, self.out_norm.bias, shift, scale, 0,
                                      cfg.norm_eps)
        patches = self.proj_out(video_tok)
        sequence = self.sequence_parallel
        return self._unpatchify(patches if sequence is None else sequence.gather(patches), f, h, w)

    def stream_shape(self, batch: int, latent: tuple[int, int, int], text_len: int) -> tuple[int, int, int]:
        """(batch, rows, D) of the joint stream for latents of (frames, h, w): the text rows and the
        video patches (this rank's share under sequence parallelism)."""
        f, h, w = latent
        p = self.cfg.patch_size
        patches = f // self.cfg.temporal_patch * (h // p) * (w // p)
        if self.sequence_parallel is not None:
            patches = self.sequence_parallel.rows(patches)
        return batch, text_len + patches, self.cfg.inner_dim

    def mean_abs(self, x: torch.Tensor) -> torch.Tensor:
        """mean |x| over the batch and every row of the sequence (every rank's, when it is split)."""
        return x.abs().mean() if self.sequence_parallel is None else self.sequence_parallel.mean_abs(x)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor, tables: dict,
                ofs: torch.Tensor | None = None) -> torch.Tensor:
        """latents: (B, F, C_in, H, W) latent frames; text: (B, L, text_dim) T5 embeddings;
        timestep: (B,); tables: from `position_tables`; ofs: (B,) for 1.5-I2V.
        Returns the model output (v-prediction for CogVideoX) as (B, F, C_out, H, W)."""
        # 1. Conditioning vector from the timestep (and ofs).
        temb = self.conditioning(timestep, latents.dtype, ofs)
        # 2. Tokens: projected text and video patches, plus absolute positions where the variant has them.
        stream = self.tokens(latents, text, tables)
        # 3. The blocks, over one joint residual stream, text rows first.
        n_text = text.shape[1]
        stream = self.settle(*self.run_blocks(stream, None, temb, tables, n_text), n_text)
        # 4. Final norm, output modulation, projection back to patches.
        return self.head(stream, temb, n_text, latents.shape)
