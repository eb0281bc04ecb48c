"""How much memory a VAE decode/encode will take, before running it, and whether to tile.

`projected_decode_peak_bytes` / `projected_encode_peak_bytes` estimate the peak of the bytes that
tensors hold during `CogVideoXVAE.decode` / `encode` (activations, conv caches, input and output;
not the weights), from the config and the shapes alone. The estimate walks the network level by level
(a level = one spatial resolution) and counts, at the widest point of each level, the tensors that the
reference ops keep alive at the same time. It is a model of the code in `vae.py` and
`ops/reference.py`, so it changes when they do; tests/test_vae_tiling.py checks it against a measured
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


import torch

from .vae import (LATENT_FRAME_BATCH, SAMPLE_FRAME_BATCH, Tiling, VAEConfig, decoded_frames, encoded_frames,
                  frame_chunks)

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
