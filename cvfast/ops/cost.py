"""What each op must cost: matrix FLOPs (2 per multiply-add) and the fewest bytes a kernel can move
(each distinct input tensor read once, each output written once). Works on `meta` tensors, so a
whole forward can be costed at full CogVideoX size without running it (benchmarks/suite_roofline.py
runs the model on meta tensors and calls this for every op).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int


def tensors(*trees) -> list[torch.Tensor]:
    """The distinct tensors in nested args/kwargs/outputs: a tensor passed twice counts once."""
    seen, out = set(), []
    for tree in trees:
        for x in tree_flatten(tree)[0]:
            if isinstance(x, torch.Tensor) and id(x) not in seen:
                seen.add(id(x))
                out.append(x)
    return out


def nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for `t`: its elements, but no more than its storage holds (a broadcast
    `expand` reads its storage once)."""
    n = t.numel()
    try:
        n = min(n, t.untyped_storage().nbytes() // t.element_size())
    except (RuntimeError, NotImplementedError):
        pass
    return n * t.element_size()


def io_bytes(args, kwargs, out) -> int:
    """Bytes read (distinct tensor inputs) plus bytes written (distinct outputs)."""
    return sum(nbytes(t) for t in tensors(args, kwargs)) + sum(nbytes(t) for t in tensors(out))


def _attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_, **__) -> int:
    # QK^T and PV: 2 * (B*H) * Sq * Sk * (d_qk + d_v)
    return 2 * math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _joint_attention_flops(qkv: torch.Tensor, heads: int, *_, **__) -> int:
    batch, seq, width = qkv.shape
    return 2 * batch * heads * seq * seq * 2 * (width // (3 * heads))


def _mlp_flops(x: torch.Tensor, w1: torch.Tensor, b1, w2: torch.Tensor, *_, **__) -> int:
    rows = x.numel() // x.shape[-1]
    return 2 * rows * (w1.shape[0] * w1.shape[1] + w2.shape[0] * w2.shape[1])


def _conv_flops(x: torch.Tensor, weight: torch.Tensor, *_, **__) -> int:
    # Stride 1 with 'same' spatial padding and causal time padding: one output voxel per input voxel.
    voxels = x.shape[0] * math.prod(x.shape[2:])
    return 2 * voxels * weight.shape[0] * math.prod(weight.shape[1:])


# Ops not listed are memory bound: their elementwise and reduction FLOPs are not counted.
_FLOPS = {"attention": _attention_flops, "joint_attention": _joint_attention_flops, "gelu_mlp": _mlp_flops,
          "causal_conv3d": _conv_flops}


def op_cost(op: str, args: tuple, kwargs: dict, out) -> Cost:
    """The cost of `out = op(*args, **kwargs)` (`out` real or meta)."""
    flops = _FLOPS[op](*args, **kwargs) if op in _FLOPS else 0
    return Cost(flops, io_bytes(args, kwargs, out))
