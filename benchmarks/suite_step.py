"""`step` part of the gpu suite: one denoising step of CogVideoX-5B (49x480x720, bf16, CFG batch 2)
side by side in one process, on the same random weights: diffusers eager, diffusers with its
transformer blocks compiled (regional compilation: one `torch.compile` per block, the code shared
by the 42 identical blocks), and cvfast per configuration (backend, `compile=`, `precision=`,
`cuda_graph=`).

A step's time is measured as the pipeline runs it, through each pipeline's own per-step callback:
a call of `STEPS` steps synchronised only after its first and last steps gives (end of last - end
of first) / (STEPS - 1), so that host and device overlap as in production. Before it, each
configuration runs warm-up calls (a CUDA graph's first call runs eagerly and its second captures);
the first call's extra time over a warm one is reported as `compile_s` where a configuration
compiles. The VAE decode is timed once per distinct VAE backend. Without CUDA the tiny model stands
in, eager and compiled (no graph, no FP8 kernels), so that the record-keeping runs.
"""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from cvfast.models.geometry import latent_shape

from .harness import Row, measured_row, sync
from .models import build, diffusers_pipeline
from .suite_graph import StepClock

PROMPT = "a red panda eating bamboo in a misty forest, cinematic lighting"
PROJECTED_STEPS = 50  # CogVideoX's default step count, for the projected generation time
STEPS = 3  # 2 timed step intervals per call; a 5B step is ~1.8 s on an H200, so a call is ~6 s
# Pipelines to build, each measured eager and then with its step in a CUDA graph (`cuda_graph` is a
# per-call option, so one build and one compilation serve both): (backend, compile, precision), in
# the order of what the issue needs first, in case the budget ends; diffusers eager and compiled run
# right after the first. The fp8 ones (`precision="fp8"`: FP8 linears and 8-bit attention;
# "fp8-linear": the linears only) are not the same arithmetic as bf16: the summary names the best
# configuration overall and the best in bf16.
# "sdpa+compile" leaves the norms, modulations and MLP to Inductor (plain PyTorch ops it can fuse)
# where `auto` hands them to cvfast's Triton kernels (custom ops, opaque to Inductor).
PIPELINES = (("auto", False, "bf16"), ("auto", True, "bf16"), ("auto", True, "fp8"), ("sdpa", True, "bf16"),
             ("auto", True, "fp8-linear"), ("triton", False, "bf16"), ("sdpa", False, "bf16"))


def config_name(backend: str, compiled: bool, precision: str, graphed: bool) -> str:
    """"auto", "auto+compile+graph", "fp8+compile", ...: the precision replaces the backend's name
    when it is not bf16 (its backend is then always auto)."""
    return "+".join([precision if precision != "bf16" else backend] + ["compile"] * compiled + ["graph"] * graphed)


# name: (backend, compile, precision, cuda_graph); the forced backends uncompiled without the graph.
CONFIGS = {config_name(*pipeline, graphed): (*pipeline, graphed) for pipeline in PIPELINES
           for graphed in ((False, True) if pipeline[0] == "auto" or pipeline[1] else (False,))}


def _out_of_time(case: str, name: str) -> Row:
    return Row("step", case, name, extra=dict(skipped="the part's time budget ran out"))


def _timed_call(call, device, graphed: bool) -> tuple[float, float, StepClock]:
    """The first call's seconds (compile and warm-up included; with `graphed`, a second call
    captures), then a measured call: (first call s, measured call s, its step clock)."""
    start = time.perf_counter()
    call(graphed)
    sync(device)
    first_s = time.perf_counter() - start
    if graphed:
        call(graphed)  # the capture
    clock = StepClock(device, STEPS, every_step=False)
    start = time.perf_counter()
    call(graphed, clock)
    return first_s, time.perf_counter() - start, clock


def _cvfast_rows(model: str, device, dtype, pipeline: tuple, names: list[str], kw: dict, case: str,
                 deadline: float) -> tuple[list[Row], object]:
    """One pipeline (backend, compile, precision) measured as each configuration in `names` needs
    (eager, then graphed unless `deadline` has passed); the pipeline is returned for the rows that
    follow."""
    backend, compiled, precision = pipeline
    pipe = build(model, device, dtype, backend, precision=precision, compile=compiled)
    kw = dict(kw, **_embeds(pipe))

    def call(graphed, clock=None):
        return pipe.generate(cuda_graph=graphed, callback=clock, **kw)
    rows = []
    for name in names:
        if rows and time.perf_counter() > deadline:
            rows.append(_out_of_time(case, name))
            continue
        first_s, warm_s, clock = _timed_call(call, device, CONFIGS[name][3])
        row = Row("step", case, name, median_ms=clock.loop_ms_per_step(),
                  extra=dict(backends=pipe.backends(), first_call_s=first_s, warm_call_s=warm_s))
        if compiled and name == names[0]:  # the first call of the pipeline compiled it
            row.extra["compile_s"] = first_s - warm_s
        rows.append(row)
    return rows, pipe


PROFILE_TOP = 15  # kernels listed in the profile row


def _profile_row(pipe, kw: dict, device, case: str, name: str) -> Row:
    """One warm call under torch.profiler: the kernels (on a CPU, the ops) that take the time, by self
    time, each with its share of the total; `covered` is the share the listed ones add up to."""
    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        pipe.generate(cuda_graph=False, **kw)
        sync(device)
    events = [e for e in prof.key_averages() if (e.self_device_time_total if gpu else e.self_cpu_time_total) > 0]
    self_us = {e.key: e.self_device_time_total if gpu else e.self_cpu_time_total for e in events}
    total = sum(self_us.values())
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:PROFILE_TOP]
    return Row("step", f"{case} profile", name, median_ms=total / 1e3 / STEPS,
               extra=dict(unit="self time per step", covered=sum(us for _, us in top) / total,
                          top=[dict(name=key[:120], ms_per_step=us / 1e3 / STEPS, share=us / total) for key, us in top]))


def _embeds(pipe) -> dict:
    embeds = pipe.encode_text(PROMPT)
    return dict(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1])


def _diffusers_rows(pipe, device, size: dict, case: str, deadline: float) -> list[Row]:
    """diffusers eager, then the same pipeline with each transformer block compiled; the weights are
    `pipe`'s (copied)."""
    try:
        ref = diffusers_pipeline(pipe)
    except ImportError as exc:
        return [Row("step", case, "diffusers", extra=dict(skipped=f"no diffusers: {exc}"))]
    kw = dict(output_type="latent", num_inference_steps=STEPS, **_embeds(pipe), **size)
    rows = []
    for name in ("diffusers", "diffusers+compile"):
        if time.perf_counter() > deadline:
            rows.append(_out_of_time(case, name))
            continue
        try:
            rows.append(_diffusers_row(ref, name, kw, device, case))
        except Exception as exc:  # e.g. a compile failure: the eager row stands
            rows.append(Row("step", case, name, extra=dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")))
    return rows


def _diffusers_row(ref, name: str, kw: dict, device, case: str) -> Row:
    if name == "diffusers+compile":
        for block in ref.transformer.transformer_blocks:
            block.compile()  # diffusers' CogVideoX sets no `_repeated_blocks` for compile_repeated_blocks
    start = time.perf_counter()
    ref(generator=torch.Generator("cpu").manual_seed(0), **kw)
    sync(device)
    first_s = time.perf_counter() - start
    clock = StepClock(device, STEPS, every_step=False)

    def on_step(_pipe, i, t, tensors):
        clock(i, t, None)
        return tensors
    start = time.perf_counter()
    ref(generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=on_step, **kw)
    warm_s = time.perf_counter() - start
    row = Row("step", case, name, median_ms=clock.loop_ms_per_step(), extra=dict(first_call_s=first_s,
                                                                                warm_call_s=warm_s))
    if name == "diffusers+compile":
        row.extra["compile_s"] = first_s - warm_s
    return row


def _decode_row(pipe, device, size: dict, model: str, seen: set) -> Row | None:
    """The VAE decode of one video's latents, once per VAE backend (`seen`: those already timed)."""
    vae_backend = pipe.backends().get("causal_conv3d", "?")
    if vae_backend in seen:
        return None
    seen.add(vae_backend)
    shape = latent_shape(pipe.transformer.cfg, pipe.vae.config, size["num_frames"], size["height"], size["width"])
    z = torch.randn(1, *shape, device=device, dtype=pipe.dtype)
    return measured_row("step", f"{model} decode {'x'.join(map(str, shape))} latents", vae_backend,
                        lambda: pipe.decode(z), device, warmup=1, iters=2)


def run_step(model: str, device: torch.device, dtype: torch.dtype, *, frames: int, height: int, width: int,
             configs: list[str], deadline: float) -> tuple[list[Row], dict]:
    """Rows per configuration (each pipeline skipped if `time.perf_counter()` passes `deadline`) and
    the summary `step_<model>`: seconds per step for diffusers eager and compiled and per cvfast
    configuration."""
    size = dict(num_frames=frames, height=height, width=width)
    case = f"{model} step {frames}x{height}x{width} CFG"
    kw = dict(seed=0, progress=False, output_type="latent", num_inference_steps=STEPS, **size)
    rows, seen, pipe, baseline_done = [], set(), None, False
    for pipeline in PIPELINES:
        names = [name for name in configs if CONFIGS[name][:3] == pipeline]
        if not names:
            continue
        if time.perf_counter() > deadline:
            rows += [_out_of_time(case, name) for name in names]
            continue
        del pipe
        _free(device)
        try:
            measured, pipe = _cvfast_rows(model, device, dtype, pipeline, names, kw, case, deadline)
        except Exception as exc:  # one pipeline that fails must not cost the others
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            measured, pipe = [Row("step", case, name, extra=dict(error=error)) for name in names], None
        rows += measured
        if pipe is not None and time.perf_counter() < deadline:
            decoded = _decode_row(pipe, device, size, model, seen)
            rows += [decoded] if decoded is not None else []
        if pipe is not None and not baseline_done:  # the profile and the baseline after the first pipeline
            rows.append(_profile_row(pipe, dict(kw, **_embeds(pipe)), device, case, names[0]))
            rows += _diffusers_rows(pipe, device, size, case, deadline)
            baseline_done = True
    del pipe
    _free(device)
    return rows, {f"step_{model}": _summary(rows, device, case)}


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _summary(rows: list[Row], device: torch.device, case: str) -> dict:
    """Seconds per step: diffusers eager and compiled, cvfast per configuration; the best cvfast
    configuration's ratio to each diffusers one (the issue's targets: <= 0.70x eager, <= 0.85x compiled)."""
    seconds = {r.backend: r.median_ms / 1e3 for r in rows if r.suite == "step" and r.case == case
               and r.median_ms is not None}
    cvfast_s = {name: s for name, s in seconds.items() if name in CONFIGS}
    out = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", shape=case,
               dtype="bfloat16" if device.type == "cuda" else "float32",
               diffusers_eager_s=seconds.get("diffusers"), diffusers_compiled_s=seconds.get("diffusers+compile"),
               cvfast_s=cvfast_s)
    decode_s = {r.backend: r.median_ms / 1e3 for r in rows if r.case.startswith(case.split(" step")[0] + " decode")
                and r.median_ms is not None}
    vae_backend = {r.backend: r.extra["backends"].get("causal_conv3d") for r in rows
                   if r.case == case and r.backend in cvfast_s}
    # A 50-step generation projected from the measured step and the decode of that configuration's
    # VAE backend (text encoding, ~20 ms, left out).
    out["projected_50_steps_s"] = {name: PROJECTED_STEPS * seconds + decode_s[vae_backend[name]]
                                   for name, seconds in cvfast_s.items() if vae_backend[name] in decode_s}
    bf16_s = {name: s for name, s in cvfast_s.items() if CONFIGS[name][2] == "bf16"}
    for label, candidates in (("best", cvfast_s), ("best_bf16", bf16_s)):
        if candidates:
            best = min(candidates, key=candidates.get)
            out[label] = best
            for key in ("diffusers_eager_s", "diffusers_compiled_s"):
                if out[key]:
                    out[f"{label}_vs_{key[:-2]}"] = candidates[best] / out[key]
    return out
