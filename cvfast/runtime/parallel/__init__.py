"""One video on several GPUs (or CPU processes) of a torch.distributed job started by torchrun.

`cvfast.load(model, parallel="cfg=2,ulysses=2")` on every rank:
- cfg=2: the unconditional and conditional CFG branches run on different ranks, combined by one
  all-gather per step (`context.CFGParallel`);
- ulysses=U: the video tokens are split over U ranks, with all-to-alls around attention trading the
  sequence split for a head split (`ulysses.py`);
- the VAE decode spreads its spatial tiles over every rank (`decode.py`);
- every rank takes rank 0's seed and generator state, so the video equals the single-process one;
- rank 0 returns the frames (and alone writes files and shows progress); the others return None;
- an error on any rank ends every rank with that error (`failure.py`).

Modules: `config.py` (ParallelConfig, parsing, the checks that run before loading), `context.py`
(process groups, the pipeline's seam), `ulysses.py`, `decode.py`, `failure.py`.
"""
from .config import ParallelConfig, check_launch, check_model, parse
from .context import ParallelContext, rank_device

__all__ = ["ParallelConfig", "ParallelContext", "check_launch", "check_model", "parse", "rank_device"]
