"""Roofline of one CogVideoX transformer forward: the work it does and the least time a device needs.

Nothing is computed. The cvfast transformer is built in bf16 on `torch.device("meta")` (no memory is
allocated) and run once on meta inputs under a `TorchDispatchMode` that sees every aten call and
counts:

- FLOPs of the matrix products only: mm/addmm (2*M*N*K), bmm/baddbmm (2*B*M*N*K), convolution
  (2 * outputs * C_in/groups * kernel volume) and the fused `_scaled_dot_product_*` kernels
  (non-causal: 2*B*H*Sq*Sk*(d_qk + d_v)). Elementwise and reduction FLOPs are ignored (they are
  memory bound by orders of magnitude).
- bytes: the sum of the call's tensor inputs plus its outputs (a tensor counts `min(numel, storage)`
  elements, so a broadcast `expand` counts its storage). Pure view/metadata ops (view, permute,
  transpose, expand, slice, split, unbind, detach, ...) move nothing and are skipped.

Every aten call is attributed to a *unit*, and each unit to a label (a row's `case`):

- a call of a cvfast op (`joint_attention`, `modulate`, `gated_residual_modulate`, `gelu_mlp`, ...): the
  model is given an `OpSet` whose every entry calls the **reference** implementation with the
  label set. `bytes_reference` is what the reference's aten calls move (its attention materialises
  fp32 scores in blocks of 1,024 queries, hence its huge traffic); `bytes_fused` is the least a
  perfectly fused kernel moves: each tensor argument read once and each output written once
  (attention: just q, k, v and o);
- a call of an `nn.Linear` module outside the ops (qkv, attention output, modulation, text/patch
  embedding, timestep MLP, output projection): label "linear";
- any other aten call outside both: "linear" if it does matrix FLOPs, else "other" (concatenation,
  gated residuals, dtype casts, ...).

Outside the cvfast ops nothing is assumed fused: `bytes_fused == bytes_reference` there.

Floor: each unit takes at least max(flop / (bf16_tflops_measured * 1e12), bytes_fused /
(hbm_tbps * 1e12)) seconds on the device (`benchmarks/devices.json`; the *measured* bf16 matmul
rate, not the datasheet peak; fp8 is not used yet). A row's floor is the sum over its units, a
step's floor the sum over all units of the forward at the step batch (2 with CFG: the conditional
and unconditional passes batched, as the pipeline runs them; 1 without), and `steps` steps take
`steps` times that. The per-op rows are reported at the step batch; `forward_tflop` and
`bytes_per_forward_*` are one forward at batch 1.

Row extras: flop, bytes_reference, bytes_fused, count (units), batch, compute_ms, memory_fused_ms,
memory_reference_ms, frac_of_step_floor, ratio_bytes_reference_to_fused and, for "linear", the FLOPs
per module (qkv, attn_out, ...). The blocks are traced once and repeated (see `Trace`); a 5B
49x480x720 roofline takes about a second on a CPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from cvfast.models.config import PRESETS, TransformerConfig
from cvfast.models.transformer import CogVideoXTransformer
from cvfast.ops import OP_NAMES, Impl, OpSet
from cvfast.ops.cost import io_bytes, op_cost
from cvfast.ops.registry import reference

from .harness import Row

DEVICES_FILE = Path(__file__).with_name("devices.json")
DTYPE = torch.bfloat16
VAE_SPATIAL = 8   # CogVideoX's VAE: 8x spatial, 4x temporal compression
VAE_TEMPORAL = 4

aten = torch.ops.aten


def _packets(*names: str) -> frozenset:
    """aten overload packets by name; names this torch lacks are left out."""
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


# Ops that only make a new view or change metadata: no data moves.
_METADATA = _packets(
    "view", "_unsafe_view", "_reshape_alias", "reshape", "view_as", "permute", "transpose", "t",
    "expand", "expand_as", "slice", "select", "narrow", "unsqueeze", "squeeze", "split",
    "split_with_sizes", "chunk", "unbind", "unflatten", "flatten", "movedim", "alias", "as_strided",
    "detach", "lift_fresh", "lift_fresh_copy", "diagonal", "view_as_real", "view_as_complex",
    "_unsafe_split", "unfold", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
)
_MM = _packets("mm", "addmm")
_BMM = _packets("bmm", "baddbmm")
_MV = _packets("mv", "addmv")
_CONV = _packets("convolution", "_convolution", "cudnn_convolution", "mkldnn_convolution")
_SDPA = _packets("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_fused_attention_overrideable")


def load_devices() -> dict:
    """The entries of `devices.json` (without its `_comment`)."""
    data = json.loads(DEVICES_FILE.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _flop(func, args, out) -> int:
    """Matrix-product FLOPs of one aten call (2 per multiply-add); 0 for everything else."""
    p = func.overloadpacket
    if p in _MM:
        a, b = (args[0], args[1]) if p is aten.mm else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if p in _BMM:
        a, b = (args[0], args[1]) if p is aten.bmm else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if p in _MV:
        a = args[0] if p is aten.mv else args[1]
        return 2 * a.shape[0] * a.shape[1]
    if p in _CONV:
        x, w = args[0], args[1]
        transposed = bool(args[6]) if len(args) > 6 else False
        per_point = w.shape[1] * math.prod(w.shape[2:])  # C_in/groups (C_out/groups if transposed) x kernel
        result = out[0] if isinstance(out, (tuple, list)) else out
        return 2 * (x.numel() if transposed else result.numel()) * per_point
    if p in _SDPA:
        q, k, v = args[:3]
        return 2 * math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0


@dataclass
class _Unit:
    """One cvfast-op call, one nn.Linear call, or one aten call outside both."""
    label: str
    flop: int = 0
    bytes_reference: int = 0
    bytes_fused: int | None = None   # None: same as bytes_reference (nothing assumed fused)
    part: str | None = None          # the nn.Linear's attribute name, for the "linear" breakdown

    @property
    def fused(self) -> int:
        return self.bytes_reference if self.bytes_fused is None else self.bytes_fused


class _Counter(TorchDispatchMode):
    """Counts FLOPs and bytes of every aten call into the unit open at the time."""

    def __init__(self):
        super().__init__()
        self.units: list[_Unit] = []
        self.open: _Unit | None = None

    def begin(self, label: str, part: str | None = None) -> _Unit | None:
        if self.open is not None:  # nested (not the case in the model today): the outer unit keeps it
            return None
        self.open = _Unit(label, part=part)
        return self.open

    def end(self, unit: _Unit | None, bytes_fused: int | None = None) -> None:
        if unit is None:
            return
        unit.bytes_fused = bytes_fused
        self.units.append(unit)
        self.open = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in _METADATA or func.is_view:
            return out
        flop = _flop(func, args, out)
        nbytes = io_bytes(args, kwargs, out)
        if self.open is not None:
            self.open.flop += flop
            self.open.bytes_reference += nbytes
        else:
            self.units.append(_Unit("linear" if flop else "other", flop, nbytes))
        return out


def _counting_ops(counter: _Counter) -> OpSet:
    """An OpSet whose every op runs the reference implementation as one counted unit, with the fused
    bytes (its tensor arguments and outputs, each once) recorded."""
    def wrap(name: str) -> Impl:
        fn = reference(name)

        def counted(*args, **kwargs):
            unit = counter.begin(name)
            out = fn(*args, **kwargs)
            counter.end(unit, op_cost(name, args, kwargs, out).bytes)
            return out
        counted.__name__ = name
        return Impl("roofline", counted, devices=("meta", "cpu", "cuda"))
    return OpSet({name: wrap(name) for name in OP_NAMES})


def _config(model: str) -> TransformerConfig:
    if model == "tiny":
        from cvfast.checkpoints.tiny import TRANSFORMER
        return TRANSFORMER
    if model not in PRESETS:
        raise ValueError(f"model={model!r}: expected 'tiny' or one of {sorted(PRESETS)}")
    return PRESETS[model]


def _floor_s(flop: int, nbytes: int, dev: dict) -> float:
    return max(flop / (dev["bf16_tflops_measured"] * 1e12), nbytes / (dev["hbm_tbps"] * 1e12))


def _spec(x):
    """What a block's output depends on for an input: shape, stride and dtype of a tensor, else the value."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.dtype)
    return x


class Trace:
    """The meta model with its counting hooks; `run(batch)` returns the units of one forward.

    The transformer's blocks are identical in structure (same config, same parameter shapes), so a
    block is traced once per input signature and its units repeated for the others: the counts are
    the same as tracing every block (checked in tests/test_roofline.py), 40x faster (a meta aten
    call costs a few hundred microseconds of Python).
    """

    def __init__(self, cfg: TransformerConfig, latent_shape: tuple[int, int, int], text_len: int):
        self.cfg, self.latent_shape, self.text_len = cfg, latent_shape, text_len
        self.counter = _Counter()
        with torch.device("meta"):
            model = CogVideoXTransformer(cfg, _counting_ops(self.counter))
        self.model = model.to(DTYPE).eval().requires_grad_(False)
        for name, mod in self.model.named_modules():
            if isinstance(mod, nn.Linear):
                self._hook(mod, name.rsplit(".", 1)[-1])
        self.block_cache: dict = {}
        self.repeat_blocks = True
        for block in self.model.blocks:
            block.forward = self._once_per_signature(block.forward)
        self.tables = self.model.position_tables(*latent_shape, torch.device("meta"))

    def _once_per_signature(self, forward):
        def run(*args):
            if not self.repeat_blocks:
                return forward(*args)
            key = tuple(_spec(x) for x in tree_flatten(args)[0])
            hit = self.block_cache.get(key)
            if hit is None:
                start = len(self.counter.units)
                out = forward(*args)
                leaves, structure = tree_flatten(out)
                self.block_cache[key] = (self.counter.units[start:], [_spec(o) for o in leaves], structure)
                return out
            units, specs, structure = hit
            self.counter.units.extend(dataclasses.replace(u) for u in units)
            return tree_unflatten([torch.empty_strided(shape, stride, dtype=dtype, device="meta")
                                   for shape, stride, dtype in specs], structure)
        return run

    def _hook(self, mod: nn.Module, part: str) -> None:
        open_units: list = []
        mod.register_forward_pre_hook(lambda m, a: open_units.append(self.counter.begin("linear", part)))
        mod.register_forward_hook(lambda m, a, o: self.counter.end(open_units.pop()))

    def run(self, batch: int, repeat_blocks: bool = True) -> list[_Unit]:
        """One forward at `batch`; repeat_blocks=False traces every block (slow; for the tests)."""
        self.repeat_blocks = repeat_blocks
        cfg, (f, h, w) = self.cfg, self.latent_shape
        meta = dict(device="meta")
        latents = torch.empty(batch, f, cfg.in_channels, h, w, dtype=DTYPE, **meta)
        text = torch.empty(batch, self.text_len, cfg.text_embed_dim, dtype=DTYPE, **meta)
        timestep = torch.empty(batch, dtype=torch.int64, **meta)
        ofs = torch.empty(batch, dtype=DTYPE, **meta) if cfg.ofs_embed_dim else None
        self.counter.units, self.counter.open = [], None
        with torch.no_grad(), self.counter:
            self.model(latents, text, timestep, self.tables, ofs)
        return self.counter.units


def roofline(model: str, frames: int, height: int, width: int, steps: int = 50, cfg: bool = True,
             device_key: str = "h100-sxm") -> tuple[list[Row], dict]:
    """Per-op floor rows (at the sampler-step batch) and a summary for one model and video size.

    model: "tiny", "2b", "5b", "1.5-5b" (or another `PRESETS` key); frames/height/width: the video
    in pixels; steps: sampler steps; cfg: classifier-free guidance (step batch 2, else 1);
    device_key: an entry of `benchmarks/devices.json`. See the module docstring for what is counted.
    """
    devices = load_devices()
    if device_key not in devices:
        raise ValueError(f"device_key={device_key!r}: expected one of {sorted(devices)}")
    dev = devices[device_key]
    tcfg = _config(model)
    if frames < 1 or (frames - 1) % VAE_TEMPORAL:
        raise ValueError(f"frames={frames}: expected 4k+1")
    step_multiple = VAE_SPATIAL * tcfg.patch_size
    if height % step_multiple or width % step_multiple:
        raise ValueError(f"height x width = {height} x {width}: expected multiples of {step_multiple}")
    if steps < 1:
        raise ValueError(f"steps={steps}: expected at least 1")

    latent_frames = (frames - 1) // VAE_TEMPORAL + 1
    latent_frames += -latent_frames % tcfg.temporal_patch      # 1.5 pads an odd count at the front
    latent_shape = (latent_frames, height // VAE_SPATIAL, width // VAE_SPATIAL)
    video_tokens = (latent_frames // tcfg.temporal_patch * (latent_shape[1] // tcfg.patch_size)
                    * (latent_shape[2] // tcfg.patch_size))
    text_tokens = tcfg.max_text_seq_length
    if tcfg.use_learned_positional_embeddings:
        sample = ((tcfg.sample_frames - 1) // VAE_TEMPORAL + 1, tcfg.sample_height, tcfg.sample_width)
        if latent_shape != sample:
            raise ValueError(f"{model} has learned positions for latent {sample} only, not {latent_shape}")

    trace = Trace(tcfg, latent_shape, text_tokens)
    forward = trace.run(1)
    step_batch = 2 if cfg else 1
    step = forward if step_batch == 1 else trace.run(step_batch)

    rows_by_label: dict[str, dict] = {}
    for u in step:
        r = rows_by_label.setdefault(u.label, dict(flop=0, bytes_reference=0, bytes_fused=0, count=0,
                                                   floor_s=0.0, parts={}))
        r["flop"] += u.flop
        r["bytes_reference"] += u.bytes_reference
        r["bytes_fused"] += u.fused
        r["count"] += 1
        r["floor_s"] += _floor_s(u.flop, u.fused, dev)
        if u.part is not None:
            r["parts"][u.part] = r["parts"].get(u.part, 0) + u.flop
    step_floor_s = sum(r["floor_s"] for r in rows_by_label.values())
    compute_rate, hbm_rate = dev["bf16_tflops_measured"] * 1e12, dev["hbm_tbps"] * 1e12

    rows = []
    for label, r in sorted(rows_by_label.items(), key=lambda kv: -kv[1]["floor_s"]):
        extra = dict(flop=r["flop"], bytes_reference=r["bytes_reference"], bytes_fused=r["bytes_fused"],
                     count=r["count"], batch=step_batch,
                     compute_ms=r["flop"] / compute_rate * 1e3, memory_fused_ms=r["bytes_fused"] / hbm_rate * 1e3,
                     memory_reference_ms=r["bytes_reference"] / hbm_rate * 1e3,
                     frac_of_step_floor=r["floor_s"] / step_floor_s if step_floor_s else 0.0)
        if r["bytes_fused"]:
            extra["ratio_bytes_reference_to_fused"] = r["bytes_reference"] / r["bytes_fused"]
        if r["parts"]:
            extra["flop_by_module"] = dict(sorted(r["parts"].items(), key=lambda kv: -kv[1]))
        rows.append(Row("roofline", label, "floor", median_ms=r["floor_s"] * 1e3, tflops=None, extra=extra))

    dim, seq = tcfg.inner_dim, text_tokens + video_tokens
    forward_flop = sum(u.flop for u in forward)
    step_flop = sum(u.flop for u in step)
    summary = dict(
        model=model, size=f"{frames}x{height}x{width}", device=dev["name"], device_key=device_key,
        dtype="bf16", steps=steps, cfg=cfg, step_batch=step_batch,
        latent_shape=list(latent_shape), video_tokens=video_tokens, text_tokens=text_tokens, joint_seq=seq,
        layers=tcfg.num_layers, inner_dim=dim, heads=tcfg.num_attention_heads,
        forward_tflop=forward_flop / 1e12,
        hand_forward_tflop=tcfg.num_layers * (24 * seq * dim ** 2 + 4 * seq ** 2 * dim) / 1e12,
        step_tflop=step_flop / 1e12,
        bytes_per_forward_reference=sum(u.bytes_reference for u in forward),
        bytes_per_forward_fused=sum(u.fused for u in forward),
        bytes_per_step_reference=sum(u.bytes_reference for u in step),
        bytes_per_step_fused=sum(u.fused for u in step),
        floor_s_per_step=step_floor_s,
        compute_s_per_step=step_flop / compute_rate,
        floor_s_50_steps=50 * step_floor_s,
        bf16_tflops_measured=dev["bf16_tflops_measured"], hbm_tbps=dev["hbm_tbps"],
    )
    summary[f"floor_s_{steps}_steps"] = steps * step_floor_s
    return rows, summary


if __name__ == "__main__":  # python -m benchmarks.suite_roofline [model frames height width [device]]
    import sys

    from .harness import format_table
    argv = sys.argv[1:]
    name = argv[0] if argv else "5b"
    f, h, w = (int(x) for x in argv[1:4]) if len(argv) >= 4 else (49, 480, 720)
    key = argv[4] if len(argv) >= 5 else "h100-sxm"
    rows, summary = roofline(name, f, h, w, device_key=key)
    print(format_table(rows))
    print(json.dumps(summary, indent=1))
