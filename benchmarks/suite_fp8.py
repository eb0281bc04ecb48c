"""`fp8` part of the gpu suite (`precision="fp8"`, cvfast/ops/quantized.py), everything in one run:
- the FP8 ceiling: torch._scaled_mm on 8192^3 e4m3 operands with row-wise scales, beside the run's
  bf16 matmul ceiling (`harness.ceilings`);
- each FP8 linear of a 5B block at 5B size (2 x 17,776 rows: the CFG batch of 49x480x720) through
  `scaled_mm_linear` (the activations' quantization included) against the bf16 F.linear;
- the 8-bit attention (`triton-int8`, its inputs' quantization included) against the bf16
  attention `auto` picks, at 5B size (48 heads of 64, 17,776 rows, batch 2);
- the 5B denoising step (one transformer forward at batch 2) in bf16 and in fp8, same random
  weights: the ratio (the issue's target: fp8 <= 0.75x bf16) and the transformers' weight memory;
- `check-precision` (`cvfast.pipeline.accuracy.compare`) of those two pipelines: one forward and
  a 4-step generation at 49x480x720.
Without a CUDA device of compute capability 8.9 the kernels are recorded as skipped and the tiny
model stands in for the step and the gate (the emulation), so that the record-keeping runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cvfast.models.fp8 import weight_bytes
from cvfast.models.geometry import latent_shape
from cvfast.ops import resolve
from cvfast.ops.quantized import FP8_CAPABILITY, quantize_rows, scaled_mm_linear, triton_quantized_attention
from cvfast.pipeline.accuracy import compare

from .harness import Row, measured_row, sync, timed
from .models import build

FIVE_B = dict(dim=3072, heads=48, head_dim=64, rows=2 * 17_776)  # CogVideoX-5B at 49x480x720, CFG batch 2
GATE_STEPS = 4
PROMPT = "a red panda eating bamboo in a misty forest, cinematic lighting"


def fp8_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY


def fp8_ceiling(device: torch.device) -> float:
    """TFLOP/s of an 8192^3 e4m3 product with row-wise scales and bf16 output."""
    n = 8192
    a, b = (torch.randn(n, n, device=device).to(torch.float8_e4m3fn) for _ in range(2))
    ones = torch.ones(n, 1, device=device)
    stats = timed(lambda: torch._scaled_mm(a, b.T, scale_a=ones, scale_b=ones.T, out_dtype=torch.bfloat16), device,
                  warmup=2, iters=10)
    return 2 * n ** 3 / (stats["median_ms"] / 1e3) / 1e12


def linear_rows(device: torch.device, ceiling: float) -> list[Row]:
    rows, dim = [], FIVE_B["dim"]
    for name, width_in, width_out in (("qkv", dim, 3 * dim), ("attn_out", dim, dim), ("ff1", dim, 4 * dim),
                                      ("ff2", 4 * dim, dim)):
        x = torch.randn(FIVE_B["rows"], width_in, device=device, dtype=torch.bfloat16)
        weight = torch.randn(width_out, width_in, device=device, dtype=torch.bfloat16) * 0.02
        w8, w_scale = quantize_rows(weight)
        flops = 2 * FIVE_B["rows"] * width_in * width_out
        case = f"5b {name} {FIVE_B['rows']}x{width_in}->{width_out}"
        bf16 = measured_row("fp8", case, "bf16", lambda: F.linear(x, weight), device, flops=flops, iters=10)
        fp8 = measured_row("fp8", case, "scaled-mm", lambda: scaled_mm_linear(x, w8, w_scale, None), device,
                           flops=flops, iters=10)
        fp8.extra.update(ratio_vs_bf16=fp8.median_ms / bf16.median_ms, frac_fp8_ceiling=fp8.tflops / ceiling)
        rows += [bf16, fp8]
    return rows


def attention_rows(device: torch.device, ceiling: float) -> list[Row]:
    heads, head_dim, seq = FIVE_B["heads"], FIVE_B["head_dim"], FIVE_B["rows"] // 2
    q, k, v = (torch.randn(2, heads, seq, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * 2 * heads * seq * seq * head_dim
    case = f"5b attention 2x{heads}x{seq}x{head_dim}"
    ops = resolve("auto", device)
    bf16 = measured_row("fp8", case, ops.names()["attention"], lambda: ops.attention(q, k, v), device, flops=flops,
                        iters=5)
    int8 = measured_row("fp8", case, "triton-int8", lambda: triton_quantized_attention(q, k, v), device, flops=flops,
                        iters=5)
    int8.extra.update(ratio_vs_bf16=int8.median_ms / bf16.median_ms, frac_fp8_ceiling=int8.tflops / ceiling)
    return [bf16, int8]


def step_rows(model: str, device: torch.device, size: dict) -> list[Row]:
    """The denoising step of `model` in bf16 and fp8 (same random weights), then the gate."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipes = {precision: build(model, device, dtype, "auto", precision=precision) for precision in ("bf16", "fp8")}
    reference = pipes["bf16"]
    cfg = reference.config
    latent = latent_shape(cfg, reference.vae.config, size["num_frames"], size["height"], size["width"])
    latents = torch.randn(2, latent[0], cfg.in_channels, *latent[2:], device=device, dtype=dtype)
    text = torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, device=device, dtype=dtype)
    timestep = torch.full((2,), 500, device=device)
    tables = reference.transformer.position_tables(latent[0], latent[2], latent[3], device)
    label = f"{model} step batch 2 {size['num_frames']}x{size['height']}x{size['width']}"
    rows = []
    for precision, pipe in pipes.items():
        row = measured_row("fp8", label, precision,
                           lambda pipe=pipe: pipe.transformer(latents, text, timestep, tables), device,
                           iters=3 if device.type == "cuda" else 1)
        row.extra.update(weight_gib=weight_bytes(pipe.transformer) / 2 ** 30, backends=_quantized_backends(pipe))
        rows.append(row)
    rows[1].extra["ratio_vs_bf16"] = rows[1].median_ms / rows[0].median_ms
    sync(device)
    report = compare(reference, pipes["fp8"], PROMPT, num_inference_steps=GATE_STEPS, **size)
    rows.append(Row("fp8", f"{model} check-precision {GATE_STEPS} steps", "fp8",
                    extra=dict(passed=report["passed"], output_cosine=report["output"]["cosine"],
                               output_rel_l2=report["output"]["rel_l2"], latents_cosine=report["latents"]["cosine"],
                               latents_rel_l2=report["latents"]["rel_l2"],
                               blocks_cosine=[round(b["cosine"], 6) for b in report["blocks"]])))
    return rows


def _quantized_backends(pipe) -> str:
    names = pipe.backends()
    return f"joint_attention {names['joint_attention']}, fp8_linear {names.get('fp8_linear', '-')}"


def run_fp8(device: torch.device) -> list[Row]:
    if not fp8_capable(device):
        why = "needs a CUDA device of compute capability 8.9 (FP8 tensor cores)"
        return [Row("fp8", "kernels", "-", extra=dict(skipped=why)),
                *step_rows("tiny", device, dict(num_frames=9, height=64, width=96))]
    ceiling = fp8_ceiling(device)
    rows = [Row("fp8", "fp8 matmul ceiling 8192^3", "scaled-mm", tflops=ceiling)]
    rows += linear_rows(device, ceiling)
    rows += attention_rows(device, ceiling)
    torch.cuda.empty_cache()
    return rows + step_rows("5b", device, dict(num_frames=49, height=480, width=720))
