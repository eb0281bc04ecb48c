"""`ops` suite: each accelerated op, each backend that can run it here, at CogVideoX sizes on a GPU
(small sizes on a CPU), as a fraction of the measured ceilings and as a ratio to the reference.

Work is counted by hand per case: attention 4*B*H*S^2*D FLOPs; the MLP 16*B*S*D^2 FLOPs; a causal
3x3x3 conv 2*27*Cin*Cout*T*H*W FLOPs; the memory-bound ops by the bytes a fused kernel must move
(each input read once, each output written once).
"""
from __future__ import annotations

import torch

from cvfast import ops
from cvfast.models.config import PRESETS

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
    """(name, fn) of the reference and every registered alternative that runs on `device`."""
    found = [("reference", getattr(ops.reference, op))]
    for impl in ops.alternatives(op):
        if not impl.reasons(device):
            found.append((impl.backend, impl.fn))
    return [(n, f) for n, f in found if wanted is None or n in wanted or n == "reference"]


def _cases(sz: dict, device: torch.device, dtype: torch.dtype):
    """(op, case name, args builder, flops, bytes)."""
    el = torch.finfo(dtype).bits // 8
    seq, dim = sz["seq"], sz["dim"]
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    for heads in sz["heads"]:
        shape = (1, heads, seq, 64)
        yield ("attention", f"attention h{heads} s{seq} d64", lambda s=shape: (rnd(*s), rnd(*s), rnd(*s)),
               4 * heads * seq * seq * 64, 4 * heads * seq * 64 * el)
    heads = dim // 64
    yield ("rope", f"rope h{heads} s{seq} d64",
           lambda: (rnd(1, heads, seq, 64), torch.randn(seq, 64, device=device), torch.randn(seq, 64, device=device)),
           None, 2 * heads * seq * 64 * el + 2 * seq * 64 * 4)
    yield ("layer_norm", f"qk layer_norm h{heads} s{seq} d64",
           lambda: (rnd(1, heads, seq, 64), rnd(64), rnd(64), 1e-6), None, 2 * heads * seq * 64 * el)
    yield ("adaln_modulate", f"adaln_modulate s{seq} d{dim}",
           lambda: (rnd(1, seq, dim), rnd(dim), rnd(dim), rnd(1, dim), rnd(1, dim), 1e-5), None, 2 * seq * dim * el)
    yield ("gelu_mlp", f"gelu_mlp s{seq} d{dim}",
           lambda: (rnd(1, seq, dim), rnd(4 * dim, dim) * 0.02, rnd(4 * dim), rnd(dim, 4 * dim) * 0.02, rnd(dim)),
           16 * seq * dim * dim, (2 * seq * dim + 8 * dim * dim) * el)
    shape = sz["vae_shape"]
    numel = torch.Size(shape).numel()
    yield ("group_norm", f"spatial group_norm+silu {'x'.join(map(str, shape))}",
           lambda: (rnd(*shape), rnd(shape[1]), rnd(shape[1]), 32, 1e-6, rnd(*shape), rnd(*shape), True),
           None, 4 * numel * el)
    c = sz["vae_c"]
    yield ("causal_conv3d", f"causal_conv3d 3x3x3 {'x'.join(map(str, shape))}",
           lambda: (rnd(*shape), rnd(c, c, 3, 3, 3) * 0.02, rnd(c), rnd(shape[0], c, 2, *shape[3:])),
           2 * 27 * c * c * numel // c, 2 * numel * el)


def run_ops(model: str, device: torch.device, dtype: torch.dtype, ceil: dict, *, frames: int, height: int,
            width: int, backends: list[str] | None = None) -> list[Row]:
    rows = []
    sz = _sizes(model, device, frames, height, width)
    gpu = device.type == "cuda"
    for op, case, make_args, flops, nbytes in _cases(sz, device, dtype):
        args = make_args()
        ref_row = None
        for backend, fn in _backends_for(op, device, backends):
            row = measured_row("ops", case, backend, lambda fn=fn, a=args: fn(*a), device, flops=flops, bytes_moved=nbytes,
                               warmup=1, iters=(3 if backend == "reference" else 10) if gpu else 2,
                               dtype=str(dtype).replace("torch.", ""))
            if ref_row is None:
                ref_row = row
            else:
                row.extra["speedup_vs_reference"] = ref_row.median_ms / row.median_ms
            rows.append(of_ceiling(row, ceil))
        del args
    return rows
