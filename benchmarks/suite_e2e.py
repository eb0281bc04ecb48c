"""`e2e` suite: text encoding, one denoising step, the denoising loop and the VAE decode, each timed
separately, per cvfast backend and (with --baseline diffusers) through diffusers' pipeline holding
the same weights, in the same run, so that every speed-up is a ratio measured side by side.

With --parallel (under torchrun: `torchrun --nproc-per-node N benchmarks/run.py --suite e2e
--parallel cfg=2,...`) rank 0 first measures the stages on one rank while the others wait, then
every rank measures them in parallel; the parallel rows carry the speed-up over one rank.

With --cache SPEC (e.g. teacache:0.2) the first backend's loop is measured again with that step cache
in the same run (both loops three times, so that the ratio is not one run's noise); its row carries
the computed and skipped steps, the speed-up over the uncached loop and the distance of its latents
from the uncached ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from cvfast.core.files import replacing

from .harness import Row, measured_row, sync
from .models import build, diffusers_pipeline

PROMPT = "a red panda eating bamboo in a misty forest, cinematic lighting"
STAGES = ("text_encoding", "one_step", "loop", "decode")


def _stages_cvfast(pipe, size: dict, steps: int, seed: int):
    """Callables per stage, each the pipeline's own code path. The loop returns its final latents
    (for the cross-check between backends)."""
    kw = dict(seed=seed, progress=False, output_type="latent", **size)
    text = lambda: pipe.encode_text(PROMPT)  # noqa: E731
    embeds = text()
    kw.update(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1])
    latents = _frames(pipe.generate(num_inference_steps=1, **kw))
    if pipe.parallel is not None:  # rank 0 alone got them, and every rank decodes
        shared = [None if latents is None else latents.cpu()]  # unpickled on the CPU on every rank
        dist.broadcast_object_list(shared, src=0)
        latents = shared[0].to(pipe.device)
    return dict(text_encoding=text,
                one_step=lambda: pipe.generate(num_inference_steps=1, **kw),
                loop=lambda: _frames(pipe.generate(num_inference_steps=steps, **kw)),
                cached_loop=lambda cache: pipe.generate(num_inference_steps=steps, cache=cache, **kw),
                decode=lambda: pipe.decode(latents))


def _frames(result):
    return None if result is None else result.frames  # None: a parallel job's other ranks


def _stages_diffusers(pipe, size: dict, steps: int, seed: int, max_len: int, device):
    """The same stages through diffusers' pipeline. Its `__call__` runs under no_grad; the pieces
    called here on their own (encode_prompt, decode_latents) need it too, or autograd keeps every
    activation of the VAE decode alive."""
    pipe.transformer.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    no_grad = torch.no_grad()

    def text():
        with no_grad:
            return pipe.encode_prompt(PROMPT, "", do_classifier_free_guidance=True, max_sequence_length=max_len,
                                      device=device)

    def decode():
        with no_grad:
            return pipe.decode_latents(latents)

    cond, uncond = text()
    kw = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, output_type="latent", **size)
    gen = lambda: torch.Generator("cpu").manual_seed(seed)  # noqa: E731
    latents = pipe(num_inference_steps=1, generator=gen(), **kw).frames
    return dict(text_encoding=text,
                one_step=lambda: pipe(num_inference_steps=1, generator=gen(), **kw),
                loop=lambda: pipe(num_inference_steps=steps, generator=gen(), **kw).frames,
                decode=decode)


def _measure(stages: dict, label: str, backend: str, device, iters: int, case_size: str,
             loop_iters: int = 1) -> tuple[list[Row], object]:
    """One row per stage; a stage that fails (e.g. out of memory) becomes an error row and the
    others are still measured."""
    rows, final = [], None
    for stage in STAGES:
        fn, holder = stages[stage], {}
        try:
            if stage == "loop":  # long: `loop_iters` times, after the one-step runs warmed everything up
                row = measured_row("e2e", f"{label} {stage}", backend, lambda: holder.update(out=fn()), device,
                                   warmup=0, iters=loop_iters, size=case_size)
                final = holder["out"]
            else:
                row = measured_row("e2e", f"{label} {stage}", backend, fn, device, warmup=1, iters=iters,
                                   size=case_size)
        except Exception as exc:  # a failed stage must not cost the other measurements
            row = Row("e2e", f"{label} {stage}", backend, extra=dict(error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            if device.type == "cuda":
                row.extra["peak_gib_before_failure"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        holder.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows, final


def run_e2e(model: str, device: torch.device, dtype: torch.dtype, *, frames: int, height: int, width: int,
            steps: int, backends: list[str], baseline: str | None, iters: int = 3, seed: int = 0,
            cache: str | None = None) -> list[Row]:
    size = dict(num_frames=frames, height=height, width=width)
    case_size = f"{frames}x{height}x{width}, {steps} steps, CFG"
    rows, finals, pipe = [], {}, None
    for backend in backends:
        pipe = build(model, device, dtype, backend)
        stages = _stages_cvfast(pipe, size, steps, seed)
        measured, finals[backend] = _measure(stages, model, backend, device, iters, case_size,
                                             loop_iters=3 if cache and backend == backends[0] else 1)
        rows += measured
        if cache and backend == backends[0]:
            row, finals[f"{backend} ({cache})"] = _cached_loop(pipe, stages, cache, model, backend, device, case_size)
            rows.append(row)
        if backend != backends[-1]:
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if baseline == "diffusers":
        try:
            ref = diffusers_pipeline(pipe)
        except ImportError as exc:
            rows.append(Row("e2e", f"{model} diffusers baseline", "diffusers", extra=dict(skipped=f"no diffusers: {exc}")))
        else:
            measured, finals["diffusers"] = _measure(
                _stages_diffusers(ref, size, steps, seed, pipe.config.max_text_seq_length, device), model,
                "diffusers", device, iters, case_size)
            rows += measured
    _add_ratios(rows, finals)
    return rows


def _cached_loop(pipe, stages: dict, cache: str, label: str, backend: str, device, case_size: str):
    """The loop stage again with the step cache `cache`: its row (computed and skipped steps in extra)
    and final latents."""
    holder = {}

    def loop():
        result = stages["cached_loop"](cache)
        holder.update(out=_frames(result), cache=result.cache if result is not None else None)
    row = measured_row("e2e", f"{label} loop", f"{backend} ({cache})", loop, device, warmup=0, iters=3,
                       size=case_size)
    report = holder.get("cache") or {}
    row.extra.update(computed_steps=report.get("computed_steps"), skipped_steps=report.get("skipped_steps"),
                     cache_bytes=report.get("bytes"))
    return row, holder.get("out")


def run_e2e_parallel(model: str, device: torch.device, dtype: torch.dtype, *, frames: int, height: int, width: int,
                     steps: int, backend: str, parallel: str, iters: int = 3, seed: int = 0) -> list[Row]:
    """The stages on one rank (rank 0, while the others wait), then on every rank of the job with
    `parallel`, in the same run; the parallel rows get speedup_vs_<backend> (1 rank) and the loop
    row the relative L2 distance of its latents from one rank's. Every rank returns the rows; rank
    0's hold the timings it saw, which are the job's (its stages end with the others')."""
    size = dict(num_frames=frames, height=height, width=width)
    case_size = f"{frames}x{height}x{width}, {steps} steps, CFG"
    single, parallel_label = f"{backend} (1 rank)", f"{backend} ({parallel})"
    rows, finals = [], {}
    if dist.get_rank() == 0:
        pipe = build(model, device, dtype, backend)
        rows, finals[single] = _measure(_stages_cvfast(pipe, size, steps, seed), model, single, device, iters,
                                        case_size)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    pipe = build(model, device, dtype, backend, parallel)
    measured, finals[parallel_label] = _measure(_stages_cvfast(pipe, size, steps, seed), model, parallel_label,
                                                device, iters, case_size)
    rows += measured
    _add_ratios(rows, finals)
    return rows


def _add_ratios(rows: list[Row], finals: dict) -> None:
    """speedup_vs_<other> on every row whose stage the other backend also measured, and the relative
    L2 distance of each backend's final latents from the first backend's (same seed and weights)."""
    by_stage = {}
    for row in rows:
        if row.median_ms is not None:
            by_stage.setdefault(row.case, {})[row.backend] = row
    for stage_rows in by_stage.values():
        for row in stage_rows.values():
            for other, other_row in stage_rows.items():
                if other != row.backend:
                    row.extra[f"speedup_vs_{other}"] = other_row.median_ms / row.median_ms
    finals = {k: v for k, v in finals.items() if v is not None}
    if not finals:
        return
    names = list(finals)
    base = np.asarray(finals[names[0]].float().cpu())
    for row in rows:
        if row.case.endswith("loop") and row.backend in finals and row.backend != names[0]:
            got = np.asarray(finals[row.backend].float().cpu())
            row.extra[f"latents_rel_l2_vs_{names[0]}"] = float(np.linalg.norm(got - base) / np.linalg.norm(base))


def write_trace(model: str, device: torch.device, dtype: torch.dtype, backend: str, path, *, frames: int,
                height: int, width: int) -> Path:
    """A torch.profiler trace (Chrome's format: chrome://tracing, Perfetto) of one warm denoising step
    of `backend`, written whole to `path`."""
    pipe = build(model, device, dtype, backend)
    stages = _stages_cvfast(pipe, dict(num_frames=frames, height=height, width=width), 1, 0)
    stages["one_step"]()  # warm: the kernels compiled and the allocator filled before the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        stages["one_step"]()
        sync(device)
    path = Path(path)
    with replacing(path) as temporary:
        prof.export_chrome_trace(str(temporary))
    return path
