"""Ulysses sequence parallelism for CogVideoX's joint [text; video] attention.

Each rank of a Ulysses group holds the whole text prefix and a contiguous share of the video tokens
(an uneven split when the count does not divide: the first N % U ranks take one token more; nothing
is padded). Everything but attention is per token, so the blocks run on the rank's rows unchanged.
Around attention two all-to-alls trade the sequence split for a head split:

  before: the rank's video rows of q, k, v go out by head group, so each rank receives every video
          token for its heads / U heads; its text rows need no traffic (every rank has them all);
  attention: the op the pipeline chose (any backend) on the whole sequence with heads / U heads,
          QK LayerNorm and RoPE included; the rotary tables stay whole because after the all-to-all
          each rank holds every video token (for its heads);
  after:  each rank sends every other rank the text rows and that rank's video rows of its heads,
          so each gets back its own rows with all heads (the text rows: every rank the same values).

The text rows of every layer's output are thus the same attention output on every rank; the
per-token layers around it may differ in rounding between ranks (their row counts differ), which
stays at rounding level and never reaches the output. The video tokens are split after the patch
embedding and its positions were added (cheap work each rank repeats, so no positional table needs
slicing) and gathered again after the final projection, before unpatchify.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...ops import OpSet


@dataclass(frozen=True)
class Split:
    """How N video tokens are shared: rank r holds rows offsets[r]:offsets[r] + sizes[r]."""
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, tokens: int, ranks: int) -> Split:
        return cls(tuple(tokens // ranks + (r < tokens % ranks) for r in range(ranks)))

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(sum(self.sizes[:r]) for r in range(len(self.sizes)))

    @property
    def total(self) -> int:
        return sum(self.sizes)


class SequenceParallel:
    """One rank's part of a Ulysses group. `scatter` keeps the rank's video rows (and remembers the
    split for the attention of this forward), `gather` joins the ranks' rows again, `attention`
    wraps a `joint_attention` op with the two all-to-alls."""

    def __init__(self, group, rank: int, ranks: int):
        self.group, self.rank, self.ranks = group, rank, ranks
        self.split: Split | None = None

    def rows(self, tokens: int) -> int:
        """This rank's share of `tokens` video tokens."""
        return Split.of(tokens, self.ranks).sizes[self.rank]

    def mean_abs(self, x: torch.Tensor) -> torch.Tensor:
        """mean |x| over every rank's rows of the group."""
        return mean_abs_over(x, [self.group])

    def scatter(self, video: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> this rank's rows (B, n_r, D)."""
        self.split = Split.of(video.shape[1], self.ranks)
        start = self.split.offsets[self.rank]
        return video[:, start:start + self.split.sizes[self.rank]]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows (B, n_r, P) -> every rank's, in order (B, N, P). Padded to the largest
        share for the all-gather (equal sizes work on every backend), then trimmed."""
        split = self.split
        most = max(split.sizes)
        padded = rows.new_zeros(rows.shape[0], most, *rows.shape[2:])
        padded[:, :rows.shape[1]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.ranks)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:, :n] for part, n in zip(parts, split.sizes)], dim=1)

    def attention(self, inner, qkv: torch.Tensor, heads: int, q_weight, q_bias, k_weight, k_bias, eps: float,
                  cos, sin, n_text: int) -> torch.Tensor:
        """`joint_attention`'s contract on this rank's rows: qkv (B, n_text + n_r, 3 * heads * d) ->
        (B, n_text + n_r, heads * d), computed by `inner` over the whole sequence with heads / U heads."""
        split, ranks, rank = self.split, self.ranks, self.rank
        batch, rows, width = qkv.shape
        local_heads, head_dim = heads // ranks, width // (3 * heads)
        x = qkv.view(batch, rows, 3, ranks, local_heads, head_dim)
        # Before: send video rows by head group; receive every rank's video rows of my heads.
        send = x[:, n_text:].permute(3, 1, 0, 2, 4, 5).reshape(-1, batch, 3, local_heads, head_dim)
        received = send.new_empty(split.total, batch, 3, local_heads, head_dim)
        dist.all_to_all_single(received, send, output_split_sizes=list(split.sizes),
                               input_split_sizes=[split.sizes[rank]] * ranks, group=self.group)
        whole = torch.cat((x[:, :n_text, :, rank], received.transpose(0, 1)), dim=1)
        out = inner(whole.reshape(batch, n_text + split.total, -1), local_heads, q_weight, q_bias, k_weight, k_bias,
                    eps, cos, sin, n_text)
        # After: rank j gets the text rows and its video rows, for my heads.
        out = out.reshape(batch, n_text + split.total, local_heads, head_dim)
        text, video = out[:, :n_text], out[:, n_text:]
        send = torch.cat([torch.cat((text, video[:, start:start + n]), dim=1)
                          for start, n in zip(split.offsets, split.sizes)], dim=1).transpose(0, 1).contiguous()
        mine = n_text + split.sizes[rank]
        received = send.new_empty(ranks * mine, batch, local_heads, head_dim)
        dist.all_to_all_single(received, send, output_split_sizes=[mine] * ranks,
                               input_split_sizes=[n_text + n for n in split.sizes], group=self.group)
        # (ranks, rows, B, heads/U, d) -> (B, rows, ranks * heads/U * d): head h = rank * heads/U + j.
        return received.view(ranks, mine, batch, local_heads, head_dim).permute(2, 1, 0, 3, 4).reshape(batch, mine, -1)


def mean_abs_over(x: torch.Tensor, groups: list) -> torch.Tensor:
    """mean |x| over the union of every rank's `x` in `groups` (nested process groups: each rank's
    sum and count are combined over each in turn), in x's dtype; the sums are float32."""
    total = torch.stack((x.abs().float().sum(), torch.tensor(float(x.numel()), device=x.device)))
    for group in groups:
        dist.all_reduce(total, group=group)
    return (total[0] / total[1]).to(x.dtype)


class UlyssesOps:
    """An OpSet whose `joint_attention` runs through `SequenceParallel.attention` around the wrapped
    OpSet's own (so Ulysses composes with every attention backend); every other op is the wrapped one."""

    def __init__(self, inner: OpSet, sequence: SequenceParallel):
        self.inner, self.sequence = inner, sequence

    def joint_attention(self, *args, **kwargs) -> torch.Tensor:
        return self.sequence.attention(self.inner.joint_attention, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
