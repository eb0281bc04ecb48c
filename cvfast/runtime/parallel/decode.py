"""Parallel VAE decode: the spatial tiles of a tiled decode spread over every rank of the job.

Tiles are dealt round-robin in the order `run_tiled` visits them (row-major). In each round every
rank decodes its tile and rank 0 gathers the round's tiles (each padded to the full tile size, so
one plain `gather` takes them on every backend) and feeds them in order to the same `run_tiled`
blending a single process uses. The video therefore equals the single-process tiled decode exactly
(the same tiles through the same code), and the untiled decode within the tiling's own error (see
`TILED_DECODE_BOUND` in tests/test_vae_tiling.py). Rank 0 holds one round of tiles at a time.

The alternative, frame batches handing the causal conv cache from rank to rank, is exact but
serial: every chunk waits for the previous chunk's cache, so it would save memory, not time.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ...models.vae import CogVideoXVAE
from ...models.vae_tiling import TileGrid, decide, run_tiled


def spread_tiles(x: torch.Tensor, grid: TileGrid, run_tile, out: torch.Tensor, *, rank: int, ranks: int) -> None:
    """`run_tiled`'s contract over the `ranks` ranks of the default group, all called with the same
    `x`: rank 0's `out` receives the blended mosaic; the other ranks' `out` is left untouched."""
    height, width = x.shape[-2:]
    (tile_h, tile_w) = grid.tile
    starts = [(r0, c0) for r0 in grid.starts(height, 0) for c0 in grid.starts(width, 1)]
    padded = (*out.shape[:3], grid.out_len(min(tile_h, height)), grid.out_len(min(tile_w, width)))

    def rounds():
        for first in range(0, len(starts), ranks):
            sent = out.new_zeros(padded)
            if first + rank < len(starts):
                r0, c0 = starts[first + rank]
                tile = run_tile(x[..., r0:r0 + tile_h, c0:c0 + tile_w])
                sent[..., :tile.shape[-2], :tile.shape[-1]] = tile
            gathered = [torch.empty_like(sent) for _ in range(ranks)] if rank == 0 else None
            dist.gather(sent, gathered, dst=0)
            if rank == 0:
                for (r0, c0), tile in zip(starts[first:], gathered):
                    yield tile[..., :grid.out_len(min(tile_h, height - r0)), :grid.out_len(min(tile_w, width - c0))]

    if rank == 0:
        tiles = rounds()
        run_tiled(x, grid, lambda _: next(tiles), out)
    else:
        for _ in rounds():
            pass


def decode(vae: CogVideoXVAE, latents: torch.Tensor, vae_tiling: bool | str, rank: int,
           ranks: int) -> torch.Tensor | None:
    """`vae.decode_latents(latents)` across the job, rank 0 getting the video and the others None.
    The tiling is `vae_tiling.decide`'s for `ranks` ranks; when it tiles and the latent is larger than
    one tile, the tiles are spread over the ranks, else rank 0 decodes alone."""
    config = vae.config
    batch, frames, _, height, width = latents.shape
    tiling = decide(config, vae_tiling, decode=True, batch=batch, frames=frames, height=height, width=width,
                    dtype=vae.dtype, device=latents.device, ranks=ranks)
    if tiling is not None and tiling.grid(config.spatial_factor, decode=True).applies(height, width):
        video = vae.decode_latents(latents, tiling=tiling, tiles=functools.partial(spread_tiles, rank=rank,
                                                                                   ranks=ranks))
        return video if rank == 0 else None
    return vae.decode_latents(latents) if rank == 0 else None
