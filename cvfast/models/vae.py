"""CogVideoX's causal 3D VAE (encoder and decoder), cvfast's own reference implementation.

Layout, as in diffusers' `AutoencoderKLCogVideoX` (parameter names are diffusers' names, so a
`vae/diffusion_pytorch_model.safetensors` loads by name):

    encoder: conv_in -> down_blocks[i] (resnets, then a 2x spatial downsampler that also halves time
             in the first log2(temporal_compression_ratio) blocks) -> mid_block (2 resnets)
             -> GroupNorm+SiLU -> conv_out  => (mean, logvar), 2 * latent_channels channels
    decoder: conv_in -> mid_block (2 resnets) -> up_blocks[i] (resnets, then a 2x upsampler that also
             doubles time in the first blocks) -> SpatialNorm+SiLU -> conv_out
             Every norm of the decoder is a "spatial norm": GroupNorm(h) * conv_y(z) + conv_b(z), with
             z the latent chunk being decoded, resized (nearest) to h's frames x height x width.

The pipeline speaks the sampler's latents: `encode_latents` (a posterior draw, scaled) and
`decode_latents` take and give (batch, latent_frames, latent_channels, h, w) scaled by the scaling
factor; `encode`/`decode` are diffusers' contract ((batch, channels, frames, h, w), unscaled). Spatial
tiling (`Tiling`, the tiled runs, the memory projection and the policy) is in `vae_tiling.py`.

Time is causal: every 3x3x3 conv sees the current frame and the two before it. Video is processed a
few frames at a time ("chunks", see `geometry.frame_chunks`) and the frames a conv needs from the previous
chunk travel in an explicit cache, a flat `dict[str, Tensor]` keyed by the conv's module path
(e.g. "up_blocks.0.resnets.1.conv2") holding its last kt-1 *input* frames. A chunk function takes
the previous chunk's cache and returns the next one; no module keeps state between calls. GroupNorm
statistics are taken per chunk, so the chunking is part of the numerics, not only of memory use.

Heavy math goes through the `OpSet` every module is built with: `ops.group_norm` (with the SiLU
fused into the call), `ops.spatial_norm` (the decoder's norms, latent resize and 1x1x1 convs
included, when a backend has it fused; else composed of `resize_latent`, two 1x1x1
`ops.causal_conv3d` and `ops.group_norm` with the modulation) and `ops.causal_conv3d` (every 3D
conv, kernel 3 or 1, the resnet's skip connection added by its second conv). The up/downsamplers'
per-frame 2D 3x3 convs are the exception: the op layer has no 2D conv, and running them as 1x3x3
causal convs moves the result ~1e-6 away from diffusers (see `_per_frame_conv2d`), so they stay plain
nn.Conv2d calls.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import OpSet
from ..ops.group_norm import layout
from ..ops.spatial_norm import resize_latent
from .config import VAEConfig
from .geometry import LATENT_FRAME_BATCH, SAMPLE_FRAME_BATCH, decoded_frames, encoded_frames, frame_chunks
from .vae_tiling import Tiling, run_tiled

logger = logging.getLogger("cvfast")

# Backends whose causal conv is written for channels-last 3D (NDHWC) activations. With one of them
# the encoder and decoder convert their input to that layout once; every op after it (the convs, the
# norms, PyTorch's resampling and per-frame 2D convs) keeps the layout of its input, so activations
# stay channels-last to the last conv. The reference path keeps PyTorch's default layout (and so
# diffusers' numerics).
CHANNELS_LAST_BACKENDS = ("triton",)

Cache = dict[str, torch.Tensor]  # conv module path -> its last kt-1 input frames, (b, c_in, kt-1, h, w)



class CausalConv3d(nn.Module):
    """A conv causal in time, stride 1, zero-padded in space. Parameters live in `conv` (an
    nn.Conv3d used only to hold them, giving diffusers' `<name>.conv.weight`)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, ops: OpSet | None = None):
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, kernel)
        self.ops = ops or OpSet()
        self.cache_key = ""  # set by the owning Encoder/Decoder to this module's path

    def forward(self, x: torch.Tensor, past: Cache, new: Cache, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (b, c_in, t, h, w) -> (b, c_out, t, h, w) (+ residual). Reads this conv's frames from
        `past` (absent: first chunk, the first frame is replicated instead) and writes the next ones
        into `new`."""
        weight = self.conv.weight
        keep = weight.shape[2] - 1
        if keep == 0:
            return self.ops.causal_conv3d(x, weight, self.conv.bias, None, residual)
        prev = past.get(self.cache_key)
        out = self.ops.causal_conv3d(x, weight, self.conv.bias, prev, residual)
        if x.shape[2] < keep:  # a chunk shorter than the cache: the tail spans the padding too
            head = prev if prev is not None else x[:, :, :1].expand(-1, -1, keep, -1, -1)
            x = torch.cat((head, x), dim=2)
        # clone: a view would keep the whole chunk's activation alive until the next chunk
        new[self.cache_key] = x[:, :, -keep:].clone()
        return out


class SpatialNorm3D(nn.Module):
    """SiLU(GroupNorm(f) * conv_y(z) + conv_b(z)), z the latent resized to f's frames and pixels.
    GroupNorm eps is 1e-6 whatever the config says (as in diffusers)."""

    def __init__(self, channels: int, z_channels: int, groups: int, ops: OpSet | None = None):
        super().__init__()
        self.ops = ops or OpSet()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_y = CausalConv3d(z_channels, channels, 1, self.ops)
        self.conv_b = CausalConv3d(z_channels, channels, 1, self.ops)

    def forward(self, f: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """f: (b, c, T, H, W), z: (b, z_channels, t, h, w) -> (b, c, T, H, W)."""
        n, y, b = self.norm_layer, self.conv_y.conv, self.conv_b.conv
        if self.ops.planned("spatial_norm") != "reference":  # one fused kernel: zq is never written
            return self.ops.spatial_norm(f, z, n.weight, n.bias, n.num_groups, n.eps, y.weight, y.bias, b.weight,
                                         b.bias, True)
        # Composed from the op set (a fused group_norm of another backend, if any): the resized latent
        # and the two 1x1x1 conv outputs are written. Kernel-1 convs: nothing to cache.
        zq = resize_latent(z, f.shape[-3:])
        scale, shift = self.conv_y(zq, {}, {}), self.conv_b(zq, {}, {})
        return self.ops.group_norm(f, n.weight, n.bias, n.num_groups, n.eps, scale=scale, shift=shift, silu=True)


class ResnetBlock3D(nn.Module):
    """x + conv2(norm2(conv1(norm1(x)))), each norm followed by SiLU; a 1x1x1 conv on the skip path
    when the channel count changes. Norms are plain GroupNorm (encoder) or spatial norms conditioned
    on the latent (decoder, `z_channels` given)."""

    def __init__(self, c_in: int, c_out: int, groups: int, eps: float, z_channels: int | None = None,
                 ops: OpSet | None = None):
        super().__init__()
        self.ops = ops or OpSet()
        if z_channels is None:
            self.norm1, self.norm2 = nn.GroupNorm(groups, c_in, eps=eps), nn.GroupNorm(groups, c_out, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(c_in, z_channels, groups, self.ops)
            self.norm2 = SpatialNorm3D(c_out, z_channels, groups, self.ops)
        self.conv1 = CausalConv3d(c_in, c_out, 3, self.ops)
        self.conv2 = CausalConv3d(c_out, c_out, 3, self.ops)
        if c_in != c_out:
            self.conv_shortcut = nn.Conv3d(c_in, c_out, 1)

    def _norm_silu(self, norm: nn.Module, h: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        if isinstance(norm, SpatialNorm3D):
            return norm(h, z)
        return self.ops.group_norm(h, norm.weight, norm.bias, norm.num_groups, norm.eps, silu=True)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None, past: Cache, new: Cache) -> torch.Tensor:
        """x: (b, c_in, t, h, w) -> (b, c_out, t, h, w); z: the latent chunk (decoder) or None."""
        h = self.conv1(self._norm_silu(self.norm1, x, z), past, new)
        if hasattr(self, "conv_shortcut"):
            x = self.ops.causal_conv3d(x, self.conv_shortcut.weight, self.conv_shortcut.bias, None)
        # the skip connection is added by conv2 (fused into the kernel's store on the fast path)
        return self.conv2(self._norm_silu(self.norm2, h, z), past, new, residual=x)


def _per_frame_conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv applied to every frame: (b, c, t, h, w) -> (b, c_out, t, h', w').

    Deliberately a 2D conv over (b*t) frames, as diffusers does, not a 1x3x3 3D conv (e.g. through
    ops.causal_conv3d): the two are the same math but take different kernels, and that difference
    alone puts the output ~5e-7 (decode) to ~1e-6 (encode) relative L2 away from diffusers."""
    b, c, t = x.shape[:3]
    y = conv(x.transpose(1, 2).reshape(b * t, c, *x.shape[3:]))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Downsample3D(nn.Module):
    """Halve height and width (pad right/bottom by one, 3x3 conv stride 2, per frame); with
    `compress_time` first average frame pairs, keeping an odd first frame as is (t -> 1 + (t-1)//2)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, t, h, w) -> (b, c, t', h // 2, w // 2)."""
        if self.compress_time and x.shape[2] > 1:
            keep = x.shape[2] % 2  # an odd count keeps its first frame un-pooled
            pooled = F.avg_pool3d(x[:, :, keep:], kernel_size=(2, 1, 1))
            x = torch.cat((x[:, :, :keep], pooled), dim=2) if keep else pooled
        return _per_frame_conv2d(F.pad(x, (0, 1, 0, 1)), self.conv)


class Upsample3D(nn.Module):
    """Double height and width (nearest), then a 3x3 conv per frame; with `compress_time` also double
    the frames, except that an odd first frame (the lone image frame) is not repeated
    (t -> 2t for even t, 1 + 2(t-1) for odd t > 1, 1 for t = 1)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, t, h, w) -> (b, c, t', 2h, 2w)."""
        t = x.shape[2]
        if self.compress_time and t > 1 and t % 2 == 1:
            first = F.interpolate(x[:, :, :1], scale_factor=(1.0, 2.0, 2.0))
            x = torch.cat((first, F.interpolate(x[:, :, 1:], scale_factor=2.0)), dim=2)
        elif self.compress_time and t > 1:
            x = F.interpolate(x, scale_factor=2.0)
        else:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0))
        return _per_frame_conv2d(x, self.conv)


class Stage(nn.Module):
    """A down/mid/up block: resnets, then optionally one resampler under diffusers' name
    (`downsamplers.0` / `upsamplers.0`)."""

    def __init__(self, resnets: list[ResnetBlock3D], resampler: nn.Module | None = None,
                 resampler_name: str = ""):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.resampler_name = resampler_name if resampler is not None else ""
        if resampler is not None:
            setattr(self, resampler_name, nn.ModuleList([resampler]))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None, past: Cache, new: Cache) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, z, past, new)
        if self.resampler_name:
            resampled = getattr(self, self.resampler_name)[0](x)
            # channels-last in, channels-last out (the encoder's pad + strided conv returns contiguous)
            x = resampled.contiguous(memory_format=layout(x)) if layout(x) == torch.channels_last_3d else resampled
        return x


def _in_layout(x: torch.Tensor, ops: OpSet) -> torch.Tensor:
    """x in the layout the conv backend of `ops` reads best (see CHANNELS_LAST_BACKENDS)."""
    if ops.planned("causal_conv3d") in CHANNELS_LAST_BACKENDS:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _name_caches(root: nn.Module) -> None:
    for name, module in root.named_modules():
        if isinstance(module, CausalConv3d):
            module.cache_key = name


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops: OpSet | None = None):
        super().__init__()
        self.ops = ops = ops or OpSet()
        ch, groups, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3, ops)
        self.down_blocks = nn.ModuleList()
        for i, c_out in enumerate(ch):
            c_in = ch[max(i - 1, 0)]
            resnets = [ResnetBlock3D(c_in if j == 0 else c_out, c_out, groups, eps, ops=ops)
                       for j in range(cfg.layers_per_block)]
            down = Downsample3D(c_out, compress_time=i < cfg.time_compress_levels) if i < len(ch) - 1 else None
            self.down_blocks.append(Stage(resnets, down, "downsamplers"))
        self.mid_block = Stage([ResnetBlock3D(ch[-1], ch[-1], groups, eps, ops=ops) for _ in range(2)])
        self.norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)  # 1e-6 regardless of norm_eps, as diffusers
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, ops)
        _name_caches(self)

    def forward(self, x: torch.Tensor, past: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        """One chunk. x: (b, in_channels, t, H, W) -> ((b, 2 * latent_channels, t', H/f, W/f), cache)."""
        past, new = past or {}, {}
        h = self.conv_in(_in_layout(x, self.ops), past, new)
        for block in self.down_blocks:
            h = block(h, None, past, new)
        h = self.mid_block(h, None, past, new)
        n = self.norm_out
        h = self.ops.group_norm(h, n.weight, n.bias, n.num_groups, n.eps, silu=True)
        return self.conv_out(h, past, new), new


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops: OpSet | None = None):
        super().__init__()
        self.ops = ops = ops or OpSet()
        ch, groups, eps, zc = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.norm_eps, cfg.latent_channels
        self.conv_in = CausalConv3d(zc, ch[0], 3, ops)
        self.mid_block = Stage([ResnetBlock3D(ch[0], ch[0], groups, eps, zc, ops) for _ in range(2)])
        self.up_blocks = nn.ModuleList()
        for i, c_out in enumerate(ch):
            c_in = ch[max(i - 1, 0)]
            resnets = [ResnetBlock3D(c_in if j == 0 else c_out, c_out, groups, eps, zc, ops)
                       for j in range(cfg.layers_per_block + 1)]  # one more than the encoder, as diffusers
            up = Upsample3D(c_out, compress_time=i < cfg.time_compress_levels) if i < len(ch) - 1 else None
            self.up_blocks.append(Stage(resnets, up, "upsamplers"))
        self.norm_out = SpatialNorm3D(ch[-1], zc, groups, ops)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3, ops)
        _name_caches(self)

    def forward(self, z: torch.Tensor, past: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        """One chunk. z: (b, latent_channels, t, h, w) -> ((b, out_channels, t', h*f, w*f), cache);
        t' = 4t for even t, 4t-3 for odd t (temporal factor 4)."""
        past, new = past or {}, {}
        z = _in_layout(z, self.ops)
        h = self.conv_in(z, past, new)
        h = self.mid_block(h, z, past, new)
        for block in self.up_blocks:
            h = block(h, z, past, new)
        h = self.norm_out(h, z)
        return self.conv_out(h, past, new), new


class CogVideoXVAE(nn.Module):
    """The CogVideoX VAE. Parameter names equal diffusers' `AutoencoderKLCogVideoX` state_dict."""

    def __init__(self, config: VAEConfig, ops: OpSet | None = None):
        super().__init__()
        config.check()
        self.config = config
        self.ops = ops = ops or OpSet()
        self.encoder = Encoder(config, ops)
        self.decoder = Decoder(config, ops)
        # Sized by out_channels, not latent_channels, exactly as diffusers (see VAEConfig.check).
        c = config.out_channels
        self.quant_conv = nn.Conv3d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv3d(c, c, 1) if config.use_post_quant_conv else None

    def _pointwise(self, conv: nn.Conv3d | None, x: torch.Tensor) -> torch.Tensor:
        return x if conv is None else self.ops.causal_conv3d(x, conv.weight, conv.bias, None)

    def decode_chunk(self, z: torch.Tensor, past: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        """One chunk of latent frames: z (b, latent_channels, t, h, w) -> (video (b, out_channels,
        t', h*f, w*f), the cache for the next chunk)."""
        return self.decoder(self._pointwise(self.post_quant_conv, z), past)

    def encode_chunk(self, x: torch.Tensor, past: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        """One chunk of sample frames: x (b, in_channels, t, H, W) -> (posterior moments
        (b, 2 * latent_channels, t', H/f, W/f), the cache for the next chunk)."""
        h, cache = self.encoder(x, past)
        return self._pointwise(self.quant_conv, h), cache

    def _run_frames(self, x: torch.Tensor, chunk_fn: Callable, frame_batch: int, out: torch.Tensor) -> None:
        """x (b, c, T, h, w) through `chunk_fn` one frame chunk at a time (`frame_chunks(T, frame_batch)`),
        the conv cache carried from chunk to chunk; each chunk's output is written into `out` at its
        frame offset, so no list of chunk outputs and no final concatenation is held."""
        cache: Cache | None = None
        at = 0
        for chunk in frame_chunks(x.shape[2], frame_batch):
            y, cache = chunk_fn(x[:, :, chunk], cache)
            if y.shape[:2] != out.shape[:2] or y.shape[3:] != out.shape[3:] or at + y.shape[2] > out.shape[2]:
                raise RuntimeError(f"chunk output {tuple(y.shape)} does not fit {tuple(out.shape)} at frame {at}")
            out[:, :, at:at + y.shape[2]] = y
            at += y.shape[2]
            del y
        if at != out.shape[2]:
            raise RuntimeError(f"{at} frames written into {tuple(out.shape)}")

    def _run(self, x: torch.Tensor, *, decode: bool, frame_batch: int, tiling: Tiling | None,
             sample_batch: int, tiles: Callable | None = None) -> torch.Tensor:
        """The shared driver of `decode` and `encode`: batch groups of `sample_batch` videos, each
        optionally split into spatial tiles, each tile (or the whole frame) processed frame chunk by
        frame chunk with its own conv cache. The output is allocated once, at its final size.
        `tiles`: what runs and assembles the tiles, `run_tiled`'s contract (default `run_tiled`;
        `cvfast.runtime.parallel.decode` spreads them over ranks)."""
        for name, value in (("frame_batch", frame_batch), ("sample_batch", sample_batch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive int")
        cfg = self.config
        f, levels = cfg.spatial_factor, cfg.time_compress_levels
        batch, _, frames, height, width = x.shape
        if decode:
            chunk_fn, c_out, frames_of = self.decode_chunk, cfg.out_channels, decoded_frames
        else:
            chunk_fn, c_out, frames_of = self.encode_chunk, 2 * cfg.latent_channels, encoded_frames
        out_frames = sum(frames_of(c.stop - c.start, levels) for c in frame_chunks(frames, frame_batch))
        grid = tiling.grid(f, decode=decode) if tiling is not None else None
        if grid is not None and not grid.applies(height, width):
            grid = None  # one tile would cover it: diffusers decodes/encodes it whole
        if grid is None:
            size = (height * f, width * f) if decode else (height // f, width // f)
        else:
            size = (grid.output_len(height, 0), grid.output_len(width, 1))
            plain = (grid.out_len(height), grid.out_len(width))
            if size != plain:
                logger.warning("tiling %s at spatial factor %d gives a %dx%d output for a %dx%d input, not %dx%d "
                               "(its stride and kept size disagree, as in diffusers); see Tiling.exact_for",
                               tiling, f, *size, height, width, *plain)
        out = x.new_empty((batch, c_out, out_frames, *size))
        for b0 in range(0, batch, sample_batch):
            part, target = x[b0:b0 + sample_batch], out[b0:b0 + sample_batch]
            if grid is None:
                self._run_frames(part, chunk_fn, frame_batch, target)
                continue

            def run_tile(tile: torch.Tensor) -> torch.Tensor:
                tile_out = tile.new_empty((tile.shape[0], c_out, out_frames,
                                           grid.out_len(tile.shape[3]), grid.out_len(tile.shape[4])))
                self._run_frames(tile, chunk_fn, frame_batch, tile_out)
                return tile_out
            (tiles or run_tiled)(part, grid, run_tile, target)
        return out

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, frame_batch: int = LATENT_FRAME_BATCH, tiling: Tiling | None = None,
               sample_batch: int = 1, tiles: Callable | None = None) -> torch.Tensor:
        """z: (batch, latent_channels, latent_frames, h, w), already divided by the scaling factor ->
        video (batch, out_channels, frames, h * spatial_factor, w * spatial_factor), roughly in [-1, 1],
        not clamped. frames = 4 * latent_frames - 3 for odd latent_frames (13 -> 49); even counts put
        all frames in pairs and give 4 * latent_frames.

        frame_batch: latent frames per chunk; the first chunk also takes the leftover ([0:3], [3:5], ...
        for 13 at the default 2): diffusers' batching, which the GroupNorm statistics depend on, so only
        the default reproduces diffusers (and what the VAE was trained on).
        tiling: decode in overlapping spatial tiles, blended (`Tiling`, diffusers' `enable_tiling`
        semantics); only when the latent is larger than one tile. Not equal to an untiled decode: see
        tests/test_vae_tiling.py for the size of the difference.
        sample_batch: videos decoded at a time; a larger batch goes through in groups of this many
        (nothing mixes batch elements, so the result is the same, only the peak memory changes).
        tiles: runs and blends the tiles (`_run`; the parallel decode passes its own)."""
        return self._run(z, decode=True, frame_batch=frame_batch, tiling=tiling, sample_batch=sample_batch,
                         tiles=tiles)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, frame_batch: int = SAMPLE_FRAME_BATCH, tiling: Tiling | None = None,
               sample_batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, in_channels, frames, H, W) in [-1, 1] -> (mean, logvar), each
        (batch, latent_channels, latent_frames, H / spatial_factor, W / spatial_factor), logvar
        clamped to [-30, 20]. frames = 1 + 8k (or 8k) give 1 + 2k (2k) latent frames.

        frame_batch: sample frames per chunk, the first taking the leftover ([0:9], [9:17], ... at the
        default 8). tiling, sample_batch: as in `decode` (tiles when the video is larger than one tile)."""
        moments = self._run(x, decode=False, frame_batch=frame_batch, tiling=tiling, sample_batch=sample_batch)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_latents(self, latents: torch.Tensor, *, tiling: Tiling | None = None,
                       tiles: Callable | None = None) -> torch.Tensor:
        """The sampler's latents (batch, latent_frames, latent_channels, h, w), scaled by the scaling
        factor as the transformer sees them -> video (batch, out_channels, frames, H, W) (see `decode`)."""
        z = (latents.permute(0, 2, 1, 3, 4) / self.config.scaling_factor).to(self.dtype)
        return self.decode(z, tiling=tiling, tiles=tiles)

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator, *, tiling: Tiling | None = None,
                       as_image: bool = False) -> torch.Tensor:
        """video x (batch, in_channels, frames, H, W) in [-1, 1] -> a posterior draw as the sampler's
        latents (batch, latent_frames, latent_channels, h, w), multiplied by the scaling factor (the
        inverse of `decode_latents`). as_image: the first-frame conditioning of image-to-video, which
        VAEs with `invert_scale_latents` (CogVideoX 1.5) divide by the factor instead, as their I2V
        models were trained."""
        mean, logvar = self.encode(x, tiling=tiling)
        z = self.sample_posterior(mean, logvar, generator).permute(0, 2, 1, 3, 4)
        sf = self.config.scaling_factor
        return z / sf if as_image and self.config.invert_scale_latents else z * sf

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights, which the VAE computes in."""
        return next(self.parameters()).dtype

    @staticmethod
    def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + exp(logvar / 2) * noise, shapes of mean. The noise is drawn on the generator's
        device in mean's dtype and moved to mean's device, as diffusers' `randn_tensor`, so a seeded CPU
        generator gives diffusers' `latent_dist.sample(generator)`."""
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise
