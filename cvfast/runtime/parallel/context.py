"""A pipeline's place in a parallel job: the process group, the cfg and Ulysses sub-groups, the
CFG-parallel denoiser, the same randomness on every rank, the parallel decode and failure handling."""
from __future__ import annotations

import contextlib
import itertools
import os

import torch
import torch.distributed as dist

from ...core.errors import bad_arg
from . import decode as parallel_decode
from .config import ParallelConfig, refuse_cuda_graph
from .failure import FailureWatch
from ...ops import OpSet
from .ulysses import SequenceParallel, UlyssesOps, mean_abs_over

# Each context gets its own keys on the job's store; contexts are made in the same order on every
# rank (every rank runs the same program), so the numbers agree.
_CONTEXT_NUMBERS = itertools.count()


def rank_device(device: torch.device) -> torch.device:
    """CUDA without an index -> this rank's GPU: torchrun's LOCAL_RANK, else rank % GPU count."""
    if device.type != "cuda" or device.index is not None:
        return device
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    return torch.device("cuda", rank % torch.cuda.device_count())


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class CFGParallel:
    """The denoiser a CFG-parallel rank's sampler step calls. Same contract as the transformer on the
    whole [unconditional; conditional] batch (its call and its stages, which a step cache composes),
    but it runs only this rank's half and all-gathers the other: the one collective of the step (with
    Ulysses, after the group's token gather)."""

    def __init__(self, transformer, group, index: int):
        self.transformer, self.group, self.index = transformer, group, index

    @property
    def cfg(self):
        return self.transformer.cfg

    def position_tables(self, *args, **kwargs) -> dict:
        return self.transformer.position_tables(*args, **kwargs)

    def stream_shape(self, batch: int, latent: tuple[int, int, int], text_len: int) -> tuple[int, int, int]:
        return self.transformer.stream_shape(batch // 2, latent, text_len)

    def mine(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's half of a CFG batch."""
        return t.chunk(2)[self.index]

    def both(self, out: torch.Tensor) -> torch.Tensor:
        """This rank's half of an output -> the whole batch's."""
        halves = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(halves, out.contiguous(), group=self.group)
        return torch.cat(halves)

    def __call__(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor, tables: dict,
                 ofs: torch.Tensor | None = None) -> torch.Tensor:
        return self.both(self.transformer(self.mine(latents), self.mine(text), self.mine(timestep), tables, ofs=ofs))

    def conditioning(self, timestep: torch.Tensor, dtype: torch.dtype, ofs: torch.Tensor | None = None):
        return self.transformer.conditioning(self.mine(timestep), dtype, ofs)

    def tokens(self, latents: torch.Tensor, text: torch.Tensor, tables: dict) -> torch.Tensor:
        return self.transformer.tokens(self.mine(latents), self.mine(text), tables)

    def run_blocks(self, *args, **kwargs):
        return self.transformer.run_blocks(*args, **kwargs)

    def settle(self, *args, **kwargs) -> torch.Tensor:
        return self.transformer.settle(*args, **kwargs)

    def head(self, stream: torch.Tensor, temb: torch.Tensor, n_text: int, latent_shape) -> torch.Tensor:
        return self.both(self.transformer.head(stream, temb, n_text, latent_shape))

    def mean_abs(self, x: torch.Tensor) -> torch.Tensor:
        """mean |x| over the whole job's rows (this rank holds half the batch, and with Ulysses a share
        of the video rows): sums and counts combined over both groups before dividing."""
        sequence = self.transformer.sequence_parallel
        return mean_abs_over(x, [self.group] + ([sequence.group] if sequence is not None else []))


class ParallelContext:
    """Rank r of a job of cfg * ulysses ranks: cfg index r // ulysses, Ulysses rank r % ulysses.
    Starts torch.distributed from torchrun's environment (gloo on CPU, NCCL on CUDA) unless the
    program already did; then makes the sub-groups (collectively: every rank makes every group)."""

    def __init__(self, config: ParallelConfig, device: torch.device):
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and broadcast_object_list use the current device
        if not dist.is_initialized():
            dist.init_process_group(backend=_backend_for(device))
        backend, needed = str(dist.get_backend()), _backend_for(device)
        if needed not in backend:
            raise bad_arg("parallel", str(config), f"a process group with the {needed} backend for a pipeline on "
                          f"{device.type}; this program initialised torch.distributed with {backend!r}")
        self.config, self.device = config, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        cfg, ulysses = config.cfg, config.ulysses
        self.cfg_index, self.ulysses_rank = divmod(self.rank, ulysses)
        self.cfg_group = self._my_group([[c * ulysses + u for c in range(cfg)] for u in range(ulysses)]) \
            if cfg > 1 else None
        self.ulysses_group = self._my_group([[c * ulysses + u for u in range(ulysses)] for c in range(cfg)]) \
            if ulysses > 1 else None
        self.sequence = SequenceParallel(self.ulysses_group, self.ulysses_rank, ulysses) \
            if self.ulysses_group is not None else None
        self.watch = FailureWatch(dist.distributed_c10d._get_default_store(), f"cvfast/{next(_CONTEXT_NUMBERS)}",
                                  self.rank, self.world, self._abort)

    def _my_group(self, groups: list[list[int]]):
        mine = None
        for ranks in groups:  # new_group is collective: every rank creates every group, in order
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = group
        return mine

    def _abort(self) -> None:
        """Make this rank's pending collectives raise (NCCL only: gloo's cannot be aborted)."""
        if _backend_for(self.device) != "nccl":
            return
        for group in (self.cfg_group, self.ulysses_group, dist.group.WORLD):
            if group is not None:
                with contextlib.suppress(Exception):
                    dist.distributed_c10d._abort_process_group(group)

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that reports progress, returns frames and writes files."""
        return self.rank == 0

    @property
    def sequence_parallel(self) -> SequenceParallel | None:
        """This rank's part of its Ulysses group (the transformer is built with it), or None."""
        return self.sequence

    def transformer_ops(self, ops: OpSet) -> OpSet | UlyssesOps:
        """The ops the transformer is built with: with Ulysses, its attention wrapped in the all-to-alls."""
        return ops if self.sequence is None else UlyssesOps(ops, self.sequence)

    def scope(self):
        """Wraps parallel work: an error on any rank ends every rank with that error (`failure.py`)."""
        return self.watch.scope()

    def check_request(self, guidance: float, cuda_graph: bool) -> None:
        """generate()'s arguments that a parallel pipeline cannot take."""
        refuse_cuda_graph(self.config, cuda_graph)
        if self.config.cfg == 2 and guidance <= 1.0:
            raise bad_arg("guidance_scale", guidance, f"> 1 with parallel={str(self.config)!r}: cfg=2 runs the two "
                          "CFG branches on different ranks, and guidance_scale <= 1 has only one (load with "
                          "cfg=1 to run without guidance)")

    def denoiser(self, transformer):
        """What the sampler step calls instead of the transformer."""
        return CFGParallel(transformer, self.cfg_group, self.cfg_index) if self.cfg_group is not None else transformer

    def same_randomness(self, seed: int | None, generator: torch.Generator) -> int | None:
        """Every rank takes rank 0's seed and generator state, so every rank draws the same initial
        and scheduler noise (the SAT engine broadcasts its noise for the same reason). Returns the seed."""
        shared = [seed, generator.get_state()]
        dist.broadcast_object_list(shared, src=0)
        generator.set_state(shared[1])
        return shared[0]

    def decode(self, vae, latents: torch.Tensor, vae_tiling: bool | str) -> torch.Tensor | None:
        """`vae.decode_latents` across the job: rank 0 gets the video, the others None."""
        return parallel_decode.decode(vae, latents, vae_tiling, self.rank, self.world)
