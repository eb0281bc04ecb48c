"""Spatial tiling of the VAE: the tile grid, the tiled run with diffusers' blending, the memory
projection that says whether a call fits untiled, and the one policy (`decide`) that picks the
tiling of a call, for one process and for a parallel job's decode.

## Memory projection

How much memory a VAE decode/encode will take, before running it, and whether to tile.

`projected_decode_peak_bytes` / `projected_encode_peak_bytes` estimate the peak of the bytes that
tensors hold during `CogVideoXVAE.decode` / `encode` (activations, conv caches, input and output;
not the weights), from the config and the shapes alone. The estimate walks the network level by level
(a level = one spatial resolution) and counts, at the widest point of each level, the tensors that the
reference ops keep alive at the same time. It is a model of the code in `vae.py` and the
reference ops, so it changes when they do; tests/test_vae_tiling.py checks it against a measured
CPU peak and against the measured CUDA peak of the full-size decode.

The formula (all sizes in bytes; s = bytes per element, B = videos processed at once):

    unit(level)   = B * frames(level) * height(level) * width(level) * s     (one channel of one chunk)
    peak          = max over chunks k and levels l of
                        unit(l) * live(l, k) + caches(l, k)
                    + input + output

  live(l, k): the most channel-units alive at once in any block of level l (a resnet, or the stem
  conv_in / head norm_out+conv_out at the ends), for the frames of chunk k, the max over the steps
  of a resnet c_in -> c_out:

    norm1:  n * c_in + zn                 x (is the norm's input) + (n - 1) norm temporaries
    conv1:  c_in * (2 + 2 p) + c_out      x, normed, the causally padded input and one scratch copy of
                                          it, the output
    norm2:  c_in + n * c_out + zn         x stays alive for the skip connection
    conv2:  c_in + c_out * (3 + 2 p)      x, h, normed, padded, scratch, output

    n = 6 for the decoder's spatial norm: its input, conv_y(z) and conv_b(z), the GroupNorm output,
          that times conv_y and that plus conv_b (reference.group_norm: `out * scale + shift` is two
          ops, so both intermediates exist when the sum is made); zn = latent_channels, the latent
          resized to the level.
    n = 3 for the encoder's plain GroupNorm+SiLU: input, GroupNorm output, SiLU output; zn = 0.
    p = (t + 2) / t: the causal conv concatenates the 2 cached frames in front of the t frames.
    The scratch copy is the conv library's re-layout of its input (oneDNN on the CPU; cuDNN's
    NCDHW -> NDHWC transform for bf16 on CUDA): one more copy of the padded input.
  The up/downsamplers (nearest/avg resize, a per-frame copy and a 2D conv: at most 4 copies of their
  input at the new size) and the 1x1 shortcut (<= 4 units) stay under the resnet they feed, so they
  are not counted.

  caches(l, k): every 3x3x3 conv keeps its last kt - 1 = 2 input frames from one chunk to the next:
    cache(m) = 2 * B * height(m) * width(m) * s * (sum of c_in over the 3x3x3 convs of level m).
    While chunk k runs, the caches of levels before l have already been rewritten (sum over m < l),
    and from the second chunk on the previous chunk's whole cache is still held (sum over all m).
    So the first chunk (3 latent frames, the largest) and a later chunk (2 frames, plus the old cache)
    are both evaluated.

  input + output: the whole latent (or video) passed in and the whole output, allocated once at its
  final size (decode writes each chunk into it).

With tiling, the same walk at the size of the largest tile (one tile runs at a time, with its own
cache), plus that tile's whole output (it is assembled before blending), plus the strips kept for the
next tiles (the bottom `blend` rows of one row of tiles and the right `blend` columns of one tile),
plus input and output.

Not counted: weights (~0.4 GB for CogVideoX's VAE in bf16), the allocator's fragmentation and cached
free blocks (CUDA's reserved memory can exceed this), conv workspaces beyond the one scratch copy.
For CogVideoX-2B's decode (13 x 60 x 90 latent, bf16) the projection is 11.7 GiB, against 12.2 GiB
measured on an H200 with ~0.4 GB of weights and the latent included.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .config import VAEConfig
from .geometry import LATENT_FRAME_BATCH, SAMPLE_FRAME_BATCH, decoded_frames, encoded_frames, frame_chunks

logger = logging.getLogger("cvfast")


@dataclass(frozen=True)
class Tiling:
    """Spatial tiling of the VAE, with diffusers' `enable_tiling` semantics.

    tile_sample_height/width: the tile in *video pixels*; the latent tile is that // spatial_factor
    (240x360 px = 30x45 latent for CogVideoX 1.0). overlap_height/width: the fraction of a tile that
    neighbouring tiles share; tiles start every int(tile * (1 - overlap)) input units and are
    linearly cross-faded over int(tile * overlap) output units (see `TileGrid`). Zero overlap is
    allowed here (diffusers treats 0 as "use the default").
    """
    tile_sample_height: int
    tile_sample_width: int
    overlap_height: float = 1 / 6
    overlap_width: float = 1 / 5

    def __post_init__(self):
        if self.tile_sample_height < 1 or self.tile_sample_width < 1:
            raise ValueError(f"tile size {self.tile_sample_height}x{self.tile_sample_width}: must be positive")
        for name in ("overlap_height", "overlap_width"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be in [0, 1)")

    @classmethod
    def for_vae(cls, config: VAEConfig) -> "Tiling":
        """diffusers' `enable_tiling()` defaults: half the VAE's sample size per tile (240x360 px for
        CogVideoX 1.0, 384x680 px for 1.5), overlaps 1/6 (height) and 1/5 (width), which diffusers
        chose by experiment at 480x720."""
        return cls(config.sample_height // 2, config.sample_width // 2)

    def grid(self, spatial_factor: int, *, decode: bool) -> "TileGrid":
        """The tile geometry of a decode (latent in, video out) or an encode (video in, latent out)."""
        f = spatial_factor
        sample = (self.tile_sample_height, self.tile_sample_width)
        latent = (sample[0] // f, sample[1] // f)
        overlap = (self.overlap_height, self.overlap_width)
        tile_in, tile_out = (latent, sample) if decode else (sample, latent)
        # The expressions are diffusers' own (float products truncated by int()) so that the
        # rounding agrees: e.g. a 4-latent tile at overlap 1/6 strides int(3.33) = 3.
        stride = tuple(int(t * (1 - o)) for t, o in zip(tile_in, overlap))
        blend = tuple(int(t * o) for t, o in zip(tile_out, overlap))
        if min(tile_in) < 1 or min(stride) < 1:
            raise ValueError(f"{self}: at spatial factor {f} the tile is {tile_in} input units with stride {stride}; "
                             "both must be at least 1")
        return TileGrid(tile_in, stride, blend, tuple(t - b for t, b in zip(tile_out, blend)),
                        f if decode else 1, 1 if decode else f)

    def keeps_size(self, spatial_factor: int, height: int, width: int, *, decode: bool) -> bool:
        """Whether a tiled decode (latent height x width) or encode (pixels) of this input returns the
        untiled call's size: always when one tile covers it, else when the grid is exact for it."""
        grid = self.grid(spatial_factor, decode=decode)
        if not grid.applies(height, width):
            return True
        return (grid.output_len(height, 0), grid.output_len(width, 1)) == (grid.out_len(height), grid.out_len(width))

    def exact_for(self, spatial_factor: int) -> bool:
        """Whether tiled output has the same height and width as untiled output, for decode and
        encode. It does when each tile's kept part (tile - blend, output units) equals the stride in
        output units; diffusers' defaults for 480x720 and 768x1360 satisfy this, but e.g. a 32x48 px
        tile at factor 8 does not (decode stride 3 latent = 24 px, kept 32 - int(32/6) = 27 px), and
        diffusers then returns a larger video with a few rows duplicated at every seam — cvfast
        mirrors that and logs a warning."""
        for g in (self.grid(spatial_factor, decode=True), self.grid(spatial_factor, decode=False)):
            if any(s * g.up != k * g.down for s, k in zip(g.stride, g.keep)):
                return False
        return True


@dataclass(frozen=True)
class TileGrid:
    """The tile geometry of one decode or encode, per axis (height, width).

    tile, stride: input units (latent pixels for decode, video pixels for encode); blend, keep: output
    units. Tiles start at 0, stride, 2*stride, ... < size (the last ones may be cut short by the
    edge); each tile's first `blend` rows/columns are cross-faded with the previous tile's last ones,
    then its first `keep` rows/columns are kept. An input length n maps to n * up // down output units.
    """
    tile: tuple[int, int]
    stride: tuple[int, int]
    blend: tuple[int, int]
    keep: tuple[int, int]
    up: int
    down: int

    def starts(self, size: int, axis: int) -> list[int]:
        return list(range(0, size, self.stride[axis]))

    def out_len(self, n: int) -> int:
        return n * self.up // self.down

    def tile_out_lens(self, size: int, axis: int) -> list[int]:
        """Output length of each tile along an axis (before cropping)."""
        return [self.out_len(min(self.tile[axis], size - s)) for s in self.starts(size, axis)]

    def output_len(self, size: int, axis: int) -> int:
        """Length of the assembled output along an axis for an input of `size`."""
        return sum(min(n, self.keep[axis]) for n in self.tile_out_lens(size, axis))

    def applies(self, height: int, width: int) -> bool:
        """diffusers tiles only an input larger than one tile in height or width."""
        return height > self.tile[0] or width > self.tile[1]


def blend_into(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first e slices of `cur` along `dim` with the last e of `prev`, in place:
    cur[k] = prev[-e + k] * (1 - k/e) + cur[k] * (k/e), k = 0..e-1, e = min(extent, both lengths).

    One broadcast expression over the whole strip (the ramp is a tensor along `dim`). The weights are
    computed in float64 and rounded once to the compute dtype, as diffusers' Python-float scalars are,
    so fp32 results are bit-equal to diffusers' loop; half-precision tiles blend in float32."""
    e = min(prev.shape[dim], cur.shape[dim], extent)
    if e == 0:
        return
    shape = [1] * cur.dim()
    shape[dim] = e
    ramp = (torch.arange(e, dtype=torch.float64, device=cur.device) / e).reshape(shape)
    compute = cur.dtype if cur.dtype in (torch.float32, torch.float64) else torch.float32
    head = cur.narrow(dim, 0, e)
    tail = prev.narrow(dim, prev.shape[dim] - e, e)
    mixed = tail.to(compute) * (1 - ramp).to(compute) + head.to(compute) * ramp.to(compute)
    head.copy_(mixed)


def run_tiled(x: torch.Tensor, grid: TileGrid, run_tile: Callable[[torch.Tensor], torch.Tensor],
              out: torch.Tensor) -> None:
    """Process x (b, c, t, H, W) tile by tile with `run_tile` and write the blended, cropped mosaic
    into `out` (b, c', t', grid.output_len(H, 0), grid.output_len(W, 1)).

    Equal to diffusers' tiled_decode/tiled_encode: tiles are visited in row-major order and each is
    first blended with the (already blended) tile above, then with the (already blended) tile to its
    left, then cropped to `keep`. Instead of holding every decoded tile until the end, as diffusers
    does, only what later tiles read is kept: the bottom `blend` rows of each tile of the previous tile
    row and the right `blend` columns of the previous tile.
    """
    height, width = x.shape[-2:]
    (th, tw), (bh, bw), (kh, kw) = grid.tile, grid.blend, grid.keep
    above: list[torch.Tensor | None] = [None] * len(grid.starts(width, 1))
    row_at = 0
    for r0 in grid.starts(height, 0):
        left: torch.Tensor | None = None
        col_at = 0
        kept_h = 0
        for j, c0 in enumerate(grid.starts(width, 1)):
            tile = run_tile(x[..., r0:r0 + th, c0:c0 + tw])
            expect = (grid.out_len(min(th, height - r0)), grid.out_len(min(tw, width - c0)))
            if tuple(tile.shape[-2:]) != expect:
                raise RuntimeError(f"tile at ({r0}, {c0}) came out {tuple(tile.shape[-2:])}, expected {expect}")
            if above[j] is not None:
                blend_into(above[j], tile, bh, dim=-2 % tile.dim())
            if left is not None:
                blend_into(left, tile, bw, dim=-1 % tile.dim())
            # clone: a view would keep the whole tile alive
            above[j] = tile[..., tile.shape[-2] - min(bh, tile.shape[-2]):, :].clone()
            left = tile[..., tile.shape[-1] - min(bw, tile.shape[-1]):].clone()
            crop = tile[..., :kh, :kw]
            out[..., row_at:row_at + crop.shape[-2], col_at:col_at + crop.shape[-1]] = crop
            col_at += crop.shape[-1]
            kept_h = crop.shape[-2]
            del tile, crop
        row_at += kept_h


SPATIAL_NORM_LIVE = 6   # decoder norm: input, conv_y(z), conv_b(z), GroupNorm out, *scale, +shift
GROUP_NORM_LIVE = 3     # encoder norm: input, GroupNorm out, SiLU out
CONV_SCRATCH = 1        # copies of the padded conv input the conv library makes (layout transform)
CAUSAL_PAD = 2          # kt - 1 cached frames in front of each chunk, per 3x3x3 conv


def _resnet_live(c_in: int, c_out: int, t: int, n: int, zn: int) -> float:
    """Most channel-units alive at once in one resnet c_in -> c_out at t frames (see the module doc)."""
    p = (t + CAUSAL_PAD) / t
    pad = 1 + CONV_SCRATCH  # padded input + its scratch copy
    return max(n * c_in + zn,
               c_in * (2 + pad * p) + c_out,
               c_in + n * c_out + zn,
               c_in + c_out * (3 + pad * p))


def _conv_live(c_in: int, c_out: int, t: int, extra: int = 0) -> float:
    """A lone 3x3x3 causal conv: its input (+ `extra` units alive beside it), padded input, scratch, output."""
    p = (t + CAUSAL_PAD) / t
    return extra + c_in * (1 + (1 + CONV_SCRATCH) * p) + c_out


def _levels(config: VAEConfig, *, decode: bool) -> list[dict]:
    """Per resolution level, outermost-first in execution order: the channel pairs of its resnets, the
    c_in of its 3x3x3 (cached) convs, its spatial scale relative to level 0 and whether the frame
    count changes after it. Mirrors `Encoder` / `Decoder` in vae.py."""
    ch, lpb, zc = config.block_out_channels, config.layers_per_block, config.latent_channels
    levels = []
    if decode:
        rev = ch[::-1]
        for i, c in enumerate(rev):
            c_prev = rev[max(i - 1, 0)]
            resnets = [(c_prev if j == 0 else c, c) for j in range(lpb + 1)]
            extra = []
            if i == 0:  # conv_in and the mid block run at the latent resolution, before up_blocks[0]
                resnets = [(c, c), (c, c)] + resnets
                extra.append(("conv_in", zc, c))
            if i == len(rev) - 1:
                extra.append(("head", c, config.out_channels))
            convs = [r[0] for r in resnets] + [r[1] for r in resnets]
            convs += [zc] if i == 0 else []
            convs += [c] if i == len(rev) - 1 else []
            levels.append(dict(scale=2 ** i, resnets=resnets, extra=extra, conv_cins=convs,
                               time_step=i < config.time_compress_levels))
    else:
        for i, c in enumerate(ch):
            c_prev = ch[max(i - 1, 0)]
            resnets = [(c_prev if j == 0 else c, c) for j in range(lpb)]
            extra = []
            if i == 0:
                extra.append(("conv_in", config.in_channels, c))
            if i == len(ch) - 1:  # mid block, norm_out + conv_out at the coarsest level
                resnets = resnets + [(c, c), (c, c)]
                extra.append(("head", c, 2 * config.latent_channels))
            convs = [r[0] for r in resnets] + [r[1] for r in resnets]
            convs += [config.in_channels] if i == 0 else []
            convs += [c] if i == len(ch) - 1 else []
            levels.append(dict(scale=2 ** -i, resnets=resnets, extra=extra, conv_cins=convs,
                               time_step=i < config.time_compress_levels and i < len(ch) - 1))
    return levels


def _chunk_walk(config: VAEConfig, chunk_lens: list[int], h: int, w: int, batch: int, itemsize: int, *,
                decode: bool) -> int:
    """max over chunk kinds and levels of unit * live + caches (the activation part of the peak) for a
    spatial size h x w at level 0 (latent for decode, video for encode)."""
    levels = _levels(config, decode=decode)
    n = SPATIAL_NORM_LIVE if decode else GROUP_NORM_LIVE
    zn = config.latent_channels if decode else 0

    def pixels(level: dict) -> int:
        s = level["scale"]
        return (h * s * w * s) if s >= 1 else (h // round(1 / s)) * (w // round(1 / s))

    caches = [2 * batch * pixels(lv) * itemsize * sum(lv["conv_cins"]) for lv in levels]
    peak = 0
    seen = set()
    for k, t0 in enumerate(chunk_lens):
        kind = (t0, k > 0)
        if kind in seen:
            continue
        seen.add(kind)
        held = sum(caches) if k > 0 else 0  # the previous chunk's cache, held until this chunk returns
        t = t0
        for i, lv in enumerate(levels):
            live = max(_resnet_live(a, b, t, n, zn) for a, b in lv["resnets"])
            for name, c_in, c_out in lv["extra"]:
                if name == "conv_in":
                    live = max(live, _conv_live(c_in, c_out, t))
                elif decode:  # head: spatial norm_out on c_in, then conv_out beside its input h
                    live = max(live, n * c_in + zn, _conv_live(c_in, c_out, t, extra=c_in))
                else:  # head: GroupNorm+SiLU then conv_out
                    live = max(live, n * c_in, _conv_live(c_in, c_out, t, extra=c_in))
            unit = batch * t * pixels(lv) * itemsize
            peak = max(peak, int(unit * live) + held + sum(caches[:i]))
            if lv["time_step"]:
                t = 2 * t - t % 2 if decode else (t + 1) // 2
    return peak


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name}={value!r}: must be positive")


def projected_decode_peak_bytes(config: VAEConfig, latent_frames: int, latent_h: int, latent_w: int,
                                dtype: torch.dtype, *, frame_batch: int = LATENT_FRAME_BATCH,
                                tiling: Tiling | None = None, batch: int = 1, sample_batch: int | None = None) -> int:
    """Projected peak bytes of `CogVideoXVAE.decode(z, frame_batch=, tiling=, sample_batch=)` for z of
    shape (batch, latent_channels, latent_frames, latent_h, latent_w) in `dtype` (see the module
    docstring for the formula). `sample_batch` (default: all of `batch`) videos are decoded at once;
    the output of all `batch` is counted. Weights are not included."""
    for name, v in (("latent_frames", latent_frames), ("latent_h", latent_h), ("latent_w", latent_w),
                    ("frame_batch", frame_batch), ("batch", batch)):
        _check(name, v)
    s, f = _itemsize(dtype), config.spatial_factor
    at_once = min(batch, sample_batch or batch)
    chunks = [c.stop - c.start for c in frame_chunks(latent_frames, frame_batch)]
    frames = sum(decoded_frames(t, config.time_compress_levels) for t in chunks)
    latent = batch * config.latent_channels * latent_frames * latent_h * latent_w * s
    grid = tiling.grid(f, decode=True) if tiling is not None else None
    if grid is None or not grid.applies(latent_h, latent_w):
        out = batch * config.out_channels * frames * latent_h * f * latent_w * f * s
        return _chunk_walk(config, chunks, latent_h, latent_w, at_once, s, decode=True) + latent + out
    th, tw = min(grid.tile[0], latent_h), min(grid.tile[1], latent_w)
    out_h, out_w = grid.output_len(latent_h, 0), grid.output_len(latent_w, 1)
    out = batch * config.out_channels * frames * out_h * out_w * s
    per_frame = at_once * config.out_channels * frames * s  # one output pixel of one tile, all frames
    tile_video = per_frame * th * f * tw * f
    strips = per_frame * (min(grid.blend[0], th * f) * sum(grid.tile_out_lens(latent_w, 1))
                          + th * f * min(grid.blend[1], tw * f))
    return _chunk_walk(config, chunks, th, tw, at_once, s, decode=True) + tile_video + strips + latent + out


def projected_encode_peak_bytes(config: VAEConfig, frames: int, height: int, width: int, dtype: torch.dtype, *,
                                frame_batch: int = SAMPLE_FRAME_BATCH, tiling: Tiling | None = None,
                                batch: int = 1, sample_batch: int | None = None) -> int:
    """Projected peak bytes of `CogVideoXVAE.encode(x, frame_batch=, tiling=, sample_batch=)` for x of
    shape (batch, in_channels, frames, height, width) in `dtype`; the same formula as the decode, with
    the encoder's plain GroupNorm (3 live tensors) and its levels getting coarser."""
    for name, v in (("frames", frames), ("height", height), ("width", width), ("frame_batch", frame_batch),
                    ("batch", batch)):
        _check(name, v)
    s, f = _itemsize(dtype), config.spatial_factor
    at_once = min(batch, sample_batch or batch)
    chunks = [c.stop - c.start for c in frame_chunks(frames, frame_batch)]
    latent_frames = sum(encoded_frames(t, config.time_compress_levels) for t in chunks)
    moments = 2 * config.latent_channels
    video = batch * config.in_channels * frames * height * width * s
    grid = tiling.grid(f, decode=False) if tiling is not None else None
    if grid is None or not grid.applies(height, width):
        out = batch * moments * latent_frames * (height // f) * (width // f) * s
        return _chunk_walk(config, chunks, height, width, at_once, s, decode=False) + video + out
    th, tw = min(grid.tile[0], height), min(grid.tile[1], width)
    out = batch * moments * latent_frames * grid.output_len(height, 0) * grid.output_len(width, 1) * s
    per_px = at_once * moments * latent_frames * s
    tile_out = per_px * (th // f) * (tw // f)
    strips = per_px * (min(grid.blend[0], th // f) * sum(grid.tile_out_lens(width, 1))
                       + (th // f) * min(grid.blend[1], tw // f))
    return _chunk_walk(config, chunks, th, tw, at_once, s, decode=False) + tile_out + strips + video + out


def choose_tiling(projected_bytes: int, free_bytes: int, safety: float = 0.9) -> bool:
    """Tile when the projected peak exceeds `safety` of the free memory (the margin covers what the
    projection leaves out: allocator fragmentation, workspaces, whatever else is allocated meanwhile).
    Exactly at safety * free_bytes it does not tile."""
    return projected_bytes > safety * free_bytes


# What free_device_bytes answers when it cannot tell: effectively "plenty", so that an unknown
# device is never tiled on a guess (tiling changes the output; see Tiling).
UNKNOWN_FREE_BYTES = 1 << 62


def free_device_bytes(device: torch.device | str) -> int:
    """Bytes that can still be allocated on `device`.

    CUDA: the driver's free memory (torch.cuda.mem_get_info; memory that PyTorch's caching allocator
    holds but does not use is not counted as free). CPU: MemAvailable from /proc/meminfo (Linux), else
    psutil's available memory if psutil is installed, else UNKNOWN_FREE_BYTES. Other devices:
    UNKNOWN_FREE_BYTES."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return UNKNOWN_FREE_BYTES
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file says kB and means KiB
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return UNKNOWN_FREE_BYTES
    return int(psutil.virtual_memory().available)


def decide(config: VAEConfig, setting: bool | str, *, decode: bool, batch: int, frames: int, height: int,
           width: int, dtype: torch.dtype, device: torch.device, ranks: int = 1) -> Tiling | None:
    """The tiling of one VAE call whose input is `batch` x `frames` x `height` x `width` (latent units
    for a decode, pixels for an encode): `setting` True/False as asked (a size whose tiles would change
    the output is refused before any work, see `keeps_size`); "auto":
    - in one process, tile exactly when the projected peak of the untiled call does not fit in what
      the device has free (read now: call it after the other components were offloaded) and the tiles
      keep the output size (else it runs untiled, with one warning line);
    - on `ranks` > 1 ranks (the parallel decode), tile whenever the VAE's tiles fit its frames exactly
      (`Tiling.exact_for`: CogVideoX's own VAEs at their sizes), so that the ranks share the work,
      whatever the memory."""
    if setting is False:
        return None
    tiling = Tiling.for_vae(config)
    if setting is True:
        return tiling
    if ranks > 1:
        return tiling if tiling.exact_for(config.spatial_factor) else None
    if decode:
        untiled = projected_decode_peak_bytes(config, frames, height, width, dtype, batch=batch)
    else:
        untiled = projected_encode_peak_bytes(config, frames, height, width, dtype, batch=batch)
    if not choose_tiling(untiled, free_device_bytes(device)):
        return None
    if not tiling.keeps_size(config.spatial_factor, height, width, decode=decode):
        logger.warning("cvfast: the VAE would need tiling to fit in memory, but its tiles do not fit this size "
                       "exactly (they would change the output size); running untiled")
        return None
    return tiling


def keeps_size(config: VAEConfig, height: int, width: int, *, encode: bool) -> bool:
    """Whether the VAE's default tiles keep the size of a video of height x width pixels: its decode,
    and with `encode` (an image or video to encode) its encode too."""
    tiling, f = Tiling.for_vae(config), config.spatial_factor
    return tiling.keeps_size(f, height // f, width // f, decode=True) and (
        not encode or tiling.keeps_size(f, height, width, decode=False))
