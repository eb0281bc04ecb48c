"""`ops` suite: each accelerated op, each backend that can run it here, at CogVideoX sizes on a GPU
(small sizes on a CPU), as a fraction of the measured ceilings and as a ratio to the reference.

Work per case comes from `cvfast.ops.cost.op_cost`: matrix FLOPs for the compute-bound ops, and for
every op the bytes a fused kernel must move (each input read once, each output written once).
`causal_conv3d` is measured on contiguous and on channels-last 3D input.
`joint_attention`'s Triton backend (the prepare pass, then the attention kernel) is also measured
against its earlier design ("triton-fused": QK LayerNorm and RoPE applied per query block as K
tiles load, `cvfast.kernels.attention.joint_attention_fused`) and unfused ("triton-unfused": QK
LayerNorm and RoPE in PyTorch, then the Triton attention kernel), and on Hopper with K and V read
through tensor descriptors (TMA, "triton-tma"). On CUDA, `attention` is also
measured with each of SDPA's kernels forced (`sdpa-flash`, `sdpa-cudnn`, `sdpa-efficient`), and
with SageAttention when its wheel is installed (`sageattention`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cvfast import ops
from cvfast.models.config import PRESETS
from cvfast.ops.cost import op_cost
from cvfast.ops.joint_attention import triton_joint_attention_unfused
from cvfast.ops.registry import reference
from cvfast.ops.triton_backend import kernels

from .harness import Row, measured_row, of_ceiling

TEXT_TOKENS = 226


def _sizes(model: str, device: torch.device, frames: int, height: int, width: int) -> dict:
    """Token counts and widths for the op cases. On a GPU: the real model at the given video size;
    on a CPU: a small stand-in so the suite takes seconds."""
    if device.type != "cuda":
        return dict(seq=TEXT_TOKENS + 390, heads=(4, 2), dim=256, vae_shape=(1, 32, 3, 40, 60), vae_c=32)
    cfg = PRESETS.get(model, PRESETS["5b"])
    latent_frames = (frames - 1) // 4 + 1
    seq = TEXT_TOKENS + latent_frames * (height // 16) * (width // 16)
    # The decoder's widest activation: 128 channels at full resolution, one latent-frame pair = 8 frames.
    return dict(seq=seq, heads=(48, 30), dim=cfg.inner_dim, vae_shape=(1, 128, 8, height, width), vae_c=128)


def _backends_for(op: str, device: torch.device, wanted: list[str] | None) -> list[tuple[str, object]]:
    """(name, fn) of the reference and every registered alternative that runs on `device`. Triton on
    a CPU (the interpreter) is left out unless asked for: its timings say nothing."""
    found = [("reference", reference(op))]
    for impl in ops.alternatives(op):
        interpreted = impl.backend == "triton" and device.type == "cpu"
        if not impl.device_reasons(device) and not (interpreted and (wanted is None or "triton" not in wanted)):
            found.append((impl.backend, impl.fn))
            if op == "joint_attention" and impl.backend == "triton":
                found += _joint_variants(device)
            if op == "attention" and impl.backend == "sdpa" and device.type == "cuda":
                found += [(f"sdpa-{name}", functools.partial(_sdpa_with, kernel)) for name, kernel in SDPA_KERNELS]
    return [(n, f) for n, f in found if wanted is None or n.split("-")[0] in wanted or n == "reference"]


# PyTorch SDPA's CUDA kernels, each forced, beside the one SDPA picks by itself ("sdpa").
SDPA_KERNELS = (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION))


def _sdpa_with(kernel, q, k, v, scale=None):
    with sdpa_kernel(kernel):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _joint_kernel(launcher, qkv, heads, q_weight, q_bias, k_weight, k_bias, eps, cos, sin, n_text):
    """The joint attention op's signature over one of `cvfast.kernels.attention`'s launchers."""
    rope = (cos.contiguous(), sin.contiguous()) if cos is not None else None
    return launcher(qkv.contiguous(), heads, (q_weight, q_bias, k_weight, k_bias, eps), rope, n_text)


def _joint_variants(device: torch.device) -> list[tuple[str, object]]:
    """The Triton joint attention's other designs: the one-kernel prologue, the unfused one, and on
    Hopper K/V through the tensor memory accelerator."""
    found = [("triton-fused", functools.partial(_joint_kernel, kernels.attention.joint_attention_fused)),
             ("triton-unfused", triton_joint_attention_unfused)]
    if device.type == "cpu" or torch.cuda.get_device_capability(device) >= (9, 0):
        found.append(("triton-tma", functools.partial(_joint_kernel, kernels.attention.joint_attention_tma)))
    return found


def _cases(sz: dict, device: torch.device, dtype: torch.dtype):
    """(op, case name, args builder)."""
    seq, dim, n_text = sz["seq"], sz["dim"], TEXT_TOKENS
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    for heads in sz["heads"]:
        shape = (1, heads, seq, 64)
        yield "attention", f"attention h{heads} s{seq} d64", lambda s=shape: (rnd(*s), rnd(*s), rnd(*s))
    heads = dim // 64
    video = seq - n_text

    def joint_args():
        angles = torch.randn(video, 32, device=device)
        cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
        return (rnd(1, seq, 3 * dim), heads, rnd(64), rnd(64), rnd(64), rnd(64), 1e-6, cos, sin, n_text)
    yield "joint_attention", f"joint_attention (qk norm + rope) h{heads} s{seq} d64", joint_args
    mod = lambda: rnd(1, 2, dim)  # noqa: E731
    yield ("modulate", f"modulate s{seq} d{dim}",
           lambda: (rnd(1, seq, dim), rnd(dim), rnd(dim), mod(), mod(), n_text, 1e-5))
    yield ("gated_residual_modulate", f"gated_residual_modulate s{seq} d{dim}",
           lambda: (rnd(1, seq, dim), rnd(1, seq, dim), mod(), rnd(dim), rnd(dim), mod(), mod(), n_text, 1e-5))
    yield ("gelu_mlp", f"gelu_mlp s{seq} d{dim}",
           lambda: (rnd(1, seq, dim), rnd(4 * dim, dim) * 0.02, rnd(4 * dim), rnd(dim, 4 * dim) * 0.02, rnd(dim)))
    shape = sz["vae_shape"]
    yield ("group_norm", f"spatial group_norm+silu {'x'.join(map(str, shape))}",
           lambda: (rnd(*shape), rnd(shape[1]), rnd(shape[1]), 32, 1e-6, rnd(*shape), rnd(*shape), True))
    z_shape = (shape[0], 16, 2, shape[3] // 8, shape[4] // 8)  # the latent chunk the spatial norm resizes
    yield ("spatial_norm", f"spatial_norm+silu {'x'.join(map(str, shape))}",
           lambda: (rnd(*shape), rnd(*z_shape), rnd(shape[1]), rnd(shape[1]), 32, 1e-6, rnd(shape[1], 16, 1, 1, 1),
                    rnd(shape[1]), rnd(shape[1], 16, 1, 1, 1), rnd(shape[1]), True))
    c = sz["vae_c"]
    # Contiguous, and channels-last 3D (the fast VAE path's layout): cuDNN (the reference's conv3d)
    # and the Triton implicit GEMM are measured on both; the comparison is what decides
    # AUTO_ORDER_BY_OP["cuda", "causal_conv3d"].
    for fmt, name in ((torch.contiguous_format, ""), (torch.channels_last_3d, " channels_last")):
        cl = lambda *s, fmt=fmt: rnd(*s).contiguous(memory_format=fmt)  # noqa: E731
        yield ("causal_conv3d", f"causal_conv3d 3x3x3 {'x'.join(map(str, shape))}{name}",
               lambda cl=cl: (cl(*shape), rnd(c, c, 3, 3, 3) * 0.02, rnd(c), cl(shape[0], c, 2, *shape[3:])))


def run_ops(model: str, device: torch.device, dtype: torch.dtype, ceil: dict, *, frames: int, height: int,
            width: int, backends: list[str] | None = None) -> list[Row]:
    rows = []
    sz = _sizes(model, device, frames, height, width)
    gpu = device.type == "cuda"
    for op, case, make_args in _cases(sz, device, dtype):
        args = make_args()
        cost = op_cost(op, args, {}, reference(op)(*args))
        flops, nbytes = cost.flops or None, cost.bytes
        ref_row = None
        for backend, fn in _backends_for(op, device, backends):
            try:
                row = measured_row("ops", case, backend, lambda fn=fn, a=args: fn(*a), device, flops=flops,
                                   bytes_moved=nbytes, warmup=1, iters=(3 if backend == "reference" else 10) if gpu else 2,
                                   dtype=str(dtype).replace("torch.", ""))
            except Exception as exc:  # a backend that cannot take this case (e.g. a forced SDPA kernel)
                rows.append(Row("ops", case, backend, extra=dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")))
                continue
            if ref_row is None:
                ref_row = row
            else:
                row.extra["speedup_vs_reference"] = ref_row.median_ms / row.median_ms
            rows.append(of_ceiling(row, ceil))
        del args
    return rows
