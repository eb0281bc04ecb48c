"""cvfast's DDIM and DPM schedulers against diffusers', step by step, including the noise draws."""
import numpy as np
import pytest
import torch

from cvfast.sampler import schedulers
from tests.extras import require

diffusers = require("diffusers")

CONFIGS = {
    "2b": dict(snr_shift_scale=3.0),
    "5b": dict(snr_shift_scale=1.0),
    "leading-eps": dict(snr_shift_scale=1.0, timestep_spacing="leading", prediction_type="epsilon",
                        rescale_betas_zero_snr=False, steps_offset=1),
}
BASE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
            num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
            set_alpha_to_one=True, timestep_spacing="trailing")


def make(kind, name):
    cls = diffusers.CogVideoXDDIMScheduler if kind == "ddim" else diffusers.CogVideoXDPMScheduler
    ref = cls(**{**BASE, **CONFIGS[name]})
    return ref, schedulers.SchedulerConfig.from_dict(dict(ref.config, _class_name=cls.__name__))


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_steps_match_diffusers(kind, name, steps):
    ref, cfg = make(kind, name)
    ref.set_timesteps(steps)
    plan = schedulers.make_plan(cfg, steps, "cpu")
    assert plan.timesteps_host == ref.timesteps.tolist()
    shape = (1, 3, 4, 5, 7)
    x_ref = x_ours = torch.randn(shape)
    gen_ref, gen_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    old_ref, old_ours = None, torch.zeros(shape)  # ours: zeros before the first step (coefficient 0)
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(shape)
        if kind == "ddim":
            x_ref = ref.step(out, t, x_ref, return_dict=False)[0]
        else:
            back = ref.timesteps[i - 1] if i > 0 else None
            x_ref, old_ref = ref.step(out, old_ref, t, back, x_ref, generator=gen_ref, return_dict=False)
        noise = [torch.randn(shape, generator=gen_ours) for _ in range(plan.noise_draws[i])]
        x_ours, old_ours = schedulers.step(plan.kind, plan.coef[i], out, x_ours, old_ours, noise[-1] if noise else None)
        assert torch.isfinite(x_ours).all()
        # epsilon: x0 = c0 * x - c1 * eps instead of diffusers' (x - s * eps) / a rounds differently.
        tol = 1e-6 if cfg.prediction_type == "v_prediction" else 1e-5
        torch.testing.assert_close(x_ours, x_ref, rtol=tol, atol=tol)
    # Both generators consumed the same number of draws.
    assert torch.equal(torch.randn(3, generator=gen_ref), torch.randn(3, generator=gen_ours))


def test_alphas_cumprod_matches():
    ref, cfg = make("ddim", "2b")
    np.testing.assert_allclose(schedulers.alphas_cumprod(cfg).numpy(), ref.alphas_cumprod.numpy(), rtol=1e-12)


def test_bad_step_count_is_rejected():
    from cvfast import CVFastInputError
    _, cfg = make("ddim", "2b")
    for bad in (0, -3, 2.5, 1001):
        with pytest.raises(CVFastInputError, match="num_inference_steps"):
            schedulers.make_plan(cfg, bad, "cpu")
