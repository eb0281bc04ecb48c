"""CogVideoX's DDIM and DPM-Solver++(2M, SDE) schedulers, read from `scheduler_config.json`.

The noise schedule (scaled-linear betas, `snr_shift_scale`, zero-terminal-SNR rescale) and the step
rules follow CogVideoX (diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler are the oracle in
tests). Everything that depends only on the step index is computed once, in float64 on the host,
into a `StepPlan` whose tensors live on the device: a step then needs no host scalars, which is
what lets the later CUDA-graph sampler capture it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.checks import known_fields
from ..core.errors import bad_arg

SCHEDULER_KINDS = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}


@dataclass(frozen=True)
class SchedulerConfig:
    kind: str = "ddim"                      # "ddim" or "dpm"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"
    rescale_betas_zero_snr: bool = True
    snr_shift_scale: float = 3.0

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        if "_class_name" not in d:
            raise ValueError(f"lacks _class_name (one of {sorted(SCHEDULER_KINDS)}), and model_index.json names no "
                             "scheduler: which scheduler it configures is unknown")
        name = d["_class_name"]
        if name not in SCHEDULER_KINDS:
            raise ValueError(f"scheduler _class_name {name!r} is not supported: one of {sorted(SCHEDULER_KINDS)}")
        cfg = cls(kind=SCHEDULER_KINDS[name], **{k: v for k, v in known_fields(cls, d).items() if k != "kind"})
        if cfg.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"beta_schedule {cfg.beta_schedule!r} is not supported: scaled_linear or linear")
        if cfg.prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"prediction_type {cfg.prediction_type!r} is not supported: v_prediction or epsilon")
        return cfg


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """(num_train_timesteps,) float64 cumulative alphas after the SNR shift and optional rescale."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32).double()
    ac = torch.cumprod(1.0 - betas, dim=0)
    # CogVideoX shifts the SNR down by snr_shift_scale: alpha' = alpha / (s + (1 - s) * alpha).
    ac = ac / (cfg.snr_shift_scale + (1 - cfg.snr_shift_scale) * ac)
    if cfg.rescale_betas_zero_snr:  # Lin et al. 2023: make the last step pure noise (SNR 0).
        root = ac.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        ac = root ** 2
    return ac


def timesteps(cfg: SchedulerConfig, num_steps: int) -> np.ndarray:
    """The num_steps training timesteps to visit, descending (int64)."""
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "trailing":
        return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, num_steps) * (n // num_steps)).round()[::-1].astype(np.int64) + cfg.steps_offset
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r}: one of trailing, leading, linspace")


@dataclass
class StepPlan:
    """Everything per step, precomputed. `coef` rows (float32, on the device) hold:
    [c_sample, c_model] to form x0 = c_sample * x - c_model * out, then
    DDIM: [a, b]             x' = a * x + b * x0
    DPM:  [m1, m2, m3, m4, mn]  x' = m1 * x - m2 * d + mn * noise, d = m3 * x0 - m4 * x0_prev.
    A DPM step without history (the first, and one that steps to the final alpha) has m3 = 1 and
    m4 = 0, so d = x0 exactly (1 * x0 and x0 - 0 are exact in floating point): the history is
    arithmetic, not a host branch, which lets a CUDA graph replay every step the same way.
    `noise_draws[i]` is how many Gaussian draws step i consumes (DPM draws one, plus one more once
    it has history, exactly like the diffusers scheduler, so a seed gives the same video); the
    step adds the last of them."""
    kind: str
    timesteps: torch.Tensor         # (steps,) int64 on the device
    timesteps_host: list[int]
    coef: torch.Tensor              # (steps, 4 or 7) float32 on the device
    noise_draws: list[int]


def first_step(num_steps: int, strength: float) -> int:
    """Video-to-video starts denoising `strength` of the way into the schedule: it skips the first
    num_steps - int(num_steps * strength) steps (CogVideoX's / diffusers' rule)."""
    return num_steps - min(int(num_steps * strength), num_steps)


def make_plan(cfg: SchedulerConfig, num_steps: int, device, start: int = 0) -> StepPlan:
    """The plan of steps start..num_steps-1 of a num_steps schedule (start > 0: video-to-video)."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise bad_arg("num_inference_steps", num_steps, "an integer >= 1")
    if num_steps > cfg.num_train_timesteps:
        raise bad_arg("num_inference_steps", num_steps, f"at most {cfg.num_train_timesteps}")
    ac = alphas_cumprod(cfg)
    ts = timesteps(cfg, num_steps)[start:]
    final = torch.tensor(1.0, dtype=torch.float64) if cfg.set_alpha_to_one else ac[0]
    stride = cfg.num_train_timesteps // num_steps  # steps back by this stride, whatever the spacing or start
    rows, draws = [], []
    for i, t in enumerate(ts.tolist()):
        prev = t - stride
        a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else final)
        if cfg.prediction_type == "v_prediction":
            x0 = [a_t ** 0.5, (1 - a_t) ** 0.5]              # x0 = sqrt(a) x - sqrt(1-a) v
        else:
            x0 = [1 / a_t ** 0.5, (1 - a_t) ** 0.5 / a_t ** 0.5]  # x0 = (x - sqrt(1-a) eps) / sqrt(a)
        if cfg.kind == "ddim":
            a = ((1 - a_prev) / (1 - a_t)) ** 0.5
            rows.append(x0 + [a, a_prev ** 0.5 - a_t ** 0.5 * a])
            draws.append(0)
            continue
        lam = ((a_t / (1 - a_t)) ** 0.5).log()
        h = ((a_prev / (1 - a_prev)) ** 0.5).log() - lam
        uses_history = i > 0 and prev >= 0  # diffusers' rule: a previous step, and not the final one
        if uses_history:
            a_back = ac[int(ts[i - 1])]
            r = (lam - ((a_back / (1 - a_back)) ** 0.5).log()) / h
            m3, m4 = 1 + 1 / (2 * r), 1 / (2 * r)
        else:
            m3, m4 = 1.0, 0.0
        m1 = ((1 - a_prev) / (1 - a_t)) ** 0.5 * (-h).exp()
        m2 = (-2 * h).expm1() * a_prev ** 0.5
        mn = (1 - a_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
        rows.append(x0 + [m1, m2, m3, m4, mn])
        draws.append(2 if uses_history else 1)
    coef = torch.tensor([[float(c) for c in row] for row in rows], dtype=torch.float32, device=device)
    return StepPlan(cfg.kind, torch.from_numpy(ts.copy()).to(device), ts.tolist(), coef, draws)


def add_noise(cfg: SchedulerConfig, clean: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    """Forward diffusion to `timestep`: sqrt(a) * clean + sqrt(1 - a) * noise, with the cumulative
    alpha cast to the latents' dtype before the square roots (as diffusers computes it)."""
    a = alphas_cumprod(cfg)[timestep].to(clean.dtype)
    return a ** 0.5 * clean + (1 - a) ** 0.5 * noise


def step(kind: str, c: torch.Tensor, model_out: torch.Tensor, sample: torch.Tensor, prev_x0: torch.Tensor | None,
         noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One update with `c`, the step's row of `StepPlan.coef` (device tensors only: no host values,
    so it can be captured in a CUDA graph). model_out, sample: (B, F, C, H, W); prev_x0: the
    previous step's x0 (DPM; zeros before the first step, where its coefficient is 0); noise: the
    last of the step's draws (DPM). Math in float32 whatever the latent dtype. Returns (new sample
    float32, x0 float32)."""
    x = sample.float()
    x0 = c[0] * x - c[1] * model_out.float()
    if kind == "ddim":
        return c[2] * x + c[3] * x0, x0
    # The second-order estimate; d = x0 exactly on steps without history (m3 = 1, m4 = 0).
    d = c[4] * x0 - c[5] * prev_x0
    return c[2] * x - c[3] * d + c[6] * noise, x0
