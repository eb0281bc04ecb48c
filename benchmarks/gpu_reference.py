"""One prepared GPU check for the reference engine, to run in a single call when a GPU is lent.

It answers, with numbers: does the reference path run on CUDA in bf16 and fp32, does CUDA fp32 agree
with the CPU fp32 run, and where does a CogVideoX step stand on this device: the measured bf16
matmul and copy ceilings, attention at the 5B and 2B sizes (SDPA vs the reference op), a 5B
transformer forward at 49x480x720 with CFG (batch 2, random weights: timing only) for backend
"reference" and "auto", and a full-size VAE decode. Until the benchmark issue lands its `gpu` suite
of `benchmarks/run.py`, this script is the GPU check. Results: JSON under $OUT (or --out).

    python benchmarks/gpu_reference.py [--out DIR] [--small]

--small shrinks every size so the script can be checked on a CPU before GPU time is spent on it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cvfast  # noqa: E402
from cvfast import ops  # noqa: E402
from cvfast.models.config import PRESETS  # noqa: E402
from cvfast.models.transformer import CogVideoXTransformer  # noqa: E402
from cvfast.models.vae import CogVideoXVAE, VAEConfig  # noqa: E402

# CogVideoX-5B/2B VAE config (diffusers vae/config.json of the THUDM releases).
REAL_VAE = dict(block_out_channels=[128, 256, 256, 512], latent_channels=16, layers_per_block=3,
                norm_num_groups=32, scaling_factor=0.7, temporal_compression_ratio=4)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device, warmup=2, iters=5) -> dict:
    """Median and p20/p80 wall time in ms (synchronised), and peak memory."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return dict(median_ms=statistics.median(times), p20_ms=q(0.2), p80_ms=q(0.8), iters=iters, peak_gib=peak)


def environment(device) -> dict:
    env = dict(python=platform.python_version(), torch=torch.__version__, cvfast=cvfast.__version__,
               device=str(device))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        # The device machine gets a copy of the tree without history: no commit to report there.
        env["git_commit"] = commit if len(commit) == 40 else None
    except OSError:
        env["git_commit"] = None
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}")
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            env["driver"] = None
    return env


def ceilings(device, small) -> dict:
    n = 1024 if small else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm = bench(lambda: a @ b, device, iters=10)
    mm["tflops"] = 2 * n ** 3 / (mm["median_ms"] / 1e3) / 1e12
    numel = (2 ** 24 if small else 2 ** 30)  # 2 GiB of bf16 on the GPU
    src = torch.empty(numel, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    cp = bench(lambda: dst.copy_(src), device, iters=10)
    cp["gbps_read_plus_write"] = 2 * src.numel() * 2 / (cp["median_ms"] / 1e3) / 1e9
    return dict(matmul_bf16=dict(n=n, **mm), copy_bf16=dict(bytes=src.numel() * 2, **cp))


def tiny_end_to_end(device) -> dict:
    kw = dict(num_inference_steps=4, seed=0, progress=False)
    cpu = cvfast.load("tiny", device="cpu", dtype=torch.float32).generate("a red boat", **kw)
    out = {"cpu_fp32_timings_s": cpu.timings}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = cvfast.load("tiny", device=device, dtype=dtype)
        res = pipe.generate("a red boat", **kw)
        res = pipe.generate("a red boat", **kw)  # second run: warm
        diff = torch.from_numpy(res.frames).double() - torch.from_numpy(cpu.frames).double()
        out[str(dtype)] = dict(timings_s=res.timings, backends=pipe.backends(),
                               rel_l2_vs_cpu_fp32=(diff.norm() / torch.from_numpy(cpu.frames).double().norm()).item(),
                               finite=bool(torch.isfinite(torch.from_numpy(res.frames)).all()))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def tiny_stage_diff(device) -> dict:
    """Each stage of the tiny model on `device` vs the CPU, fed the same inputs, per dtype: locates
    where a device/dtype combination departs from the CPU run."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        cpu = cvfast.load("tiny", device="cpu", dtype=dtype)
        dev = cvfast.load("tiny", device=device, dtype=dtype)
        ids_text = cpu.text_encoder.encode(["a red boat"], 32, "cpu", dtype)
        dev_text = dev.text_encoder.encode(["a red boat"], 32, device, dtype)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 4, 8, 12, generator=gen).to(dtype)
        text = torch.randn(2, 32, 32, generator=gen).to(dtype)
        t = torch.tensor([999, 500])
        with torch.no_grad():
            ref_v = cpu.transformer(x, text, t, cpu.transformer.position_tables(3, 8, 12, "cpu"))
            dev_v = dev.transformer(x.to(device), text.to(device), t.to(device),
                                    dev.transformer.position_tables(3, 8, 12, device))
            z = torch.randn(1, 4, 3, 8, 12, generator=gen).to(dtype)
            ref_img, dev_img = cpu.vae.decode(z), dev.vae.decode(z.to(device))
        out[str(dtype)] = dict(text_encoder=_rel(dev_text, ids_text), transformer=_rel(dev_v, ref_v),
                               vae_decode=_rel(dev_img, ref_img))
        # The same stages in this dtype against fp32 on the CPU: the dtype's own error, for scale.
        if dtype != torch.float32:
            f32 = cvfast.load("tiny", device="cpu", dtype=torch.float32)
            with torch.no_grad():
                out[str(dtype)]["cpu_vs_fp32"] = dict(
                    text_encoder=_rel(ids_text, f32.text_encoder.encode(["a red boat"], 32, "cpu", torch.float32)),
                    transformer=_rel(ref_v, f32.transformer(x.float(), text.float(), t,
                                                             f32.transformer.position_tables(3, 8, 12, "cpu"))),
                    vae_decode=_rel(ref_img, f32.vae.decode(z.float())))
    return out


def attention_cases(device, small) -> dict:
    out = {}
    for name, heads in (("5b", 48), ("2b", 30)):
        seq = 226 + (1755 if small else 17550)
        q, k, v = (torch.randn(1, heads if not small else 4, seq, 64, device=device, dtype=torch.bfloat16)
                   for _ in range(3))
        flops = 4 * seq * seq * 64 * q.shape[1]
        case = {}
        exact = ops.reference.attention(q.float(), k.float(), v.float())
        for backend, fn in (("sdpa", ops.sdpa.attention), ("reference", ops.reference.attention)):
            r = bench(lambda: fn(q, k, v), device, warmup=1, iters=3 if backend == "reference" else 10)
            r["tflops"] = flops / (r["median_ms"] / 1e3) / 1e12
            r["max_abs_err_vs_fp32"] = (fn(q, k, v).float() - exact).abs().max().item()
            case[backend] = r
        case["sdpa_speedup_vs_reference"] = case["reference"]["median_ms"] / case["sdpa"]["median_ms"]
        out[f"{name}_heads{q.shape[1]}_seq{seq}_d64_bf16"] = case
        del q, k, v, exact
    return out


def random_init_(module: torch.nn.Module, device) -> torch.nn.Module:
    """Materialise a meta-built module on `device` with small random weights (timing only)."""
    module.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return module.eval().requires_grad_(False)


def transformer_5b(device, small) -> dict:
    cfg = PRESETS["5b"]
    if small:
        import dataclasses
        cfg = dataclasses.replace(cfg, num_layers=2, num_attention_heads=4, text_embed_dim=64)
    frames, h, w = (3, 12, 18) if small else (13, 60, 90)
    out = dict(config="5b", latent_shape=[2, frames, 16, h, w], text_len=226, dtype="bfloat16", weights="random")
    seq = 226 + frames * (h // 2) * (w // 2)
    dim = cfg.inner_dim
    out["tflop_per_forward_batch2"] = 2 * cfg.num_layers * (24 * seq * dim ** 2 + 4 * seq ** 2 * dim) / 1e12
    x = torch.randn(2, frames, 16, h, w, device=device, dtype=torch.bfloat16)
    text = torch.randn(2, 226, cfg.text_embed_dim, device=device, dtype=torch.bfloat16)
    t = torch.tensor([999, 999], device=device)
    for backend in ("auto", "reference"):
        r = {}
        with torch.device("meta"):
            model = CogVideoXTransformer(cfg, ops.resolve(backend, device))
        random_init_(model, device).to(torch.bfloat16)
        tables = model.position_tables(frames, h, w, device)
        with torch.no_grad():
            r["finite"] = bool(torch.isfinite(model(x, text, t, tables)).all())  # doubles as the warm-up
            # The reference attention materialises fp32 scores (~13-20 s per 5B forward): time it once.
            r = dict(bench(lambda: model(x, text, t, tables), device, warmup=0,
                           iters=1 if backend == "reference" else 5), finite=r["finite"])
        r["tflops"] = out["tflop_per_forward_batch2"] / (r["median_ms"] / 1e3)
        r["backends"] = model.ops.names()
        out[backend] = r
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["auto_speedup_vs_reference"] = out["reference"]["median_ms"] / out["auto"]["median_ms"]
    return out


def vae_decode(device, small) -> dict:
    cfg = VAEConfig.from_dict(dict(REAL_VAE, norm_num_groups=4, block_out_channels=[8, 16, 16, 16]) if small
                              else REAL_VAE)
    frames, h, w = (5, 6, 10) if small else (13, 60, 90)
    with torch.device("meta"):
        vae = CogVideoXVAE(cfg)
    random_init_(vae, device).to(torch.bfloat16)
    z = torch.randn(1, cfg.latent_channels, frames, h, w, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        video = vae.decode(z)  # doubles as the warm-up
        r = bench(lambda: vae.decode(z), device, warmup=0, iters=2)
    r.update(latent_shape=list(z.shape), video_shape=list(video.shape), finite=bool(torch.isfinite(video).all()))
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated section names to run")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # fp32 means fp32 in the reference comparisons (cuDNN convolutions default to TF32).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = dict(script="benchmarks/gpu_reference.py", small=args.small, env=environment(device), sections={})
    out_path = Path(args.out) / ("gpu_reference_small.json" if args.small else "gpu_reference.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sections = [("ceilings", lambda: ceilings(device, args.small)), ("tiny_end_to_end", lambda: tiny_end_to_end(device)),
                ("attention", lambda: attention_cases(device, args.small)),
                ("transformer_5b_forward", lambda: transformer_5b(device, args.small)),
                ("vae_decode_49x480x720" if not args.small else "vae_decode", lambda: vae_decode(device, args.small))]
    sections.insert(2, ("tiny_stage_diff", lambda: tiny_stage_diff(device)))
    if args.only:
        sections = [(n, f) for n, f in sections if n in args.only.split(",")]
        out_path = out_path.with_name(out_path.stem + "_" + "_".join(n for n, _ in sections) + ".json")
    for name, fn in sections:
        start = time.perf_counter()
        try:
            results["sections"][name] = fn()
        except Exception as exc:  # keep what the other sections measured
            results["sections"][name] = dict(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        results["sections"][name]["section_wall_s"] = time.perf_counter() - start
        out_path.write_text(json.dumps(results, indent=1, default=str))
        print(f"== {name} ({results['sections'][name]['section_wall_s']:.1f} s)")
        print(json.dumps(results["sections"][name], indent=1, default=str)[:3000], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
