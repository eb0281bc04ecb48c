"""`parallel=`: how one video is spread over the ranks of a torch.distributed job, and the checks
that run before any weights load or any process group starts."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ...core.errors import bad_arg
from ...models.config import TransformerConfig

KEYS = ("cfg", "ulysses")
FORMAT = "'cfg=C,ulysses=U' (C in 1..2, U >= 1, either may be left out; e.g. 'cfg=2,ulysses=2')"


@dataclass(frozen=True)
class ParallelConfig:
    """cfg: 2 runs the unconditional and the conditional CFG branch on different ranks; ulysses:
    how many ranks split the video tokens (Ulysses sequence parallel). The job has cfg * ulysses
    ranks; rank = cfg_index * ulysses + ulysses_rank."""
    cfg: int = 1
    ulysses: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses

    def __str__(self) -> str:
        return f"cfg={self.cfg},ulysses={self.ulysses}"


def parse(value) -> ParallelConfig | None:
    """None, a ParallelConfig or a string such as 'cfg=2,ulysses=2' -> ParallelConfig (None for None)."""
    if value is None:
        return None
    if isinstance(value, ParallelConfig):
        config = value
    elif isinstance(value, str):
        config = ParallelConfig(**_parse_items(value))
    else:
        raise bad_arg("parallel", value, f"None, a cvfast.ParallelConfig or a string {FORMAT}")
    for key in KEYS:
        degree = getattr(config, key)
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise bad_arg("parallel", value, f"{key} must be an integer >= 1, got {degree!r}; format {FORMAT}")
    if config.cfg > 2:
        raise bad_arg("parallel", value, f"cfg=1 or cfg=2 (classifier-free guidance has two branches), "
                      f"not cfg={config.cfg}")
    return config


def _parse_items(text: str) -> dict[str, int]:
    degrees: dict[str, int] = {}
    for item in text.split(","):
        key, sep, number = (part.strip() for part in item.partition("="))
        if not sep or key not in KEYS:
            raise bad_arg("parallel", text, f"{FORMAT}; {item.strip()!r} is not KEY=N with KEY in {KEYS}")
        if key in degrees:
            raise bad_arg("parallel", text, f"{key} given twice; format {FORMAT}")
        if not number.isdigit():
            raise bad_arg("parallel", text, f"{key} must be an integer >= 1, got {number!r}")
        degrees[key] = int(number)
    return degrees


def world_size() -> int:
    """The job's size: the initialised process group's, else torchrun's WORLD_SIZE, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise bad_arg("WORLD_SIZE", raw, "a positive integer (torchrun sets it)")
    return int(raw)


def check_launch(config: ParallelConfig, offload: str, cuda_graph) -> None:
    """The checks that need neither the model nor a process group."""
    world = world_size()
    if config.world_size != world:
        hint = (f"; start the program with `torchrun --nproc-per-node {config.world_size} ...` (torch.distributed "
                "is not initialised and WORLD_SIZE is not set)" if world == 1 else "")
        raise bad_arg("parallel", str(config), f"degrees whose product is the job's world size {world}: "
                      f"cfg * ulysses = {config.world_size}{hint}")
    if config.world_size > 1 and not torch.distributed.is_available():
        raise bad_arg("parallel", str(config), "a PyTorch build with torch.distributed (this one has none)")
    if config.world_size > 1 and offload != "none":
        raise bad_arg("offload", offload, f"'none' with parallel={str(config)!r}: each rank already holds only "
                      "its share of the work; offloading is not combined with it")
    refuse_cuda_graph(config, cuda_graph)


def refuse_cuda_graph(config: ParallelConfig, cuda_graph) -> None:
    """load()'s default and each generate() call: no CUDA graphs in a parallel job (yet)."""
    if config.world_size > 1 and cuda_graph is True:
        raise bad_arg("cuda_graph", cuda_graph, f"False or 'auto' with parallel={str(config)!r}: the step's "
                      "collectives are not captured in CUDA graphs")


def check_model(config: ParallelConfig, cfg: TransformerConfig) -> None:
    """Before the weights load: the heads must split evenly over the Ulysses ranks."""
    if cfg.num_attention_heads % config.ulysses:
        raise bad_arg("parallel", str(config), f"ulysses must divide the model's {cfg.num_attention_heads} "
                      f"attention heads (each Ulysses rank attends with heads / ulysses of them)")
