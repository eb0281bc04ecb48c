"""8-bit precision (`cvfast/ops/quantized.py`, `cvfast/models/fp8.py`): the emulations against fp32,
the 8-bit attention kernel against its emulation, `load(precision=...)` on the tiny variants, and the
accuracy gate (`cvfast check-precision`).

Bounds from the arithmetic. float8 e4m3 keeps 3 mantissa bits: rounding to nearest moves a value by
at most 2^-4 of its binade, so for mantissas spread log-uniformly the RMS relative error of one
rounding is 2^-4 / sqrt(3) * sqrt(3 / (8 ln 2)) = 2.65 % (`E4M3_RMS`). The 8-bit attention rounds P
and V once each (3.75 % together) and INT8 Q.K adds about 1.3 % of a logit (127 levels for a block's
largest value, about 4 sigma), so random inputs give sqrt(2 * 2.65^2 + 1.3^2) = 3.98 %; ATTENTION_BOUND
leaves 13 % of that for the spread between draws. An FP8 linear rounds x and W once each: 3.75 %,
bound 5 %. (The issue asked for 3 % on the attention: below the 3.75 % that rounding P and V to e4m3
costs on random inputs whatever the scales, so no FP8 P.V attention can meet it.)
"""
import json
import math

import pytest
import torch

import cvfast
from cvfast.cli.main import main
from cvfast.core.errors import CVFastInputError
from cvfast.models.fp8 import FP8Linear
from cvfast.ops import quantized
from cvfast.ops.joint_attention import attention, joint_attention
from cvfast.pipeline.accuracy import compare
from tests.extras import require
from tests.fixtures import TINY_FRAMES, TINY_HEIGHT, TINY_WIDTH, tiny_folder
from tests.numerics import poison_outputs, rel_l2

E4M3_RMS = 2 ** -4 / math.sqrt(3) * math.sqrt(3 / (8 * math.log(2)))
ATTENTION_BOUND = 0.045
LINEAR_BOUND = 0.05
TEXT_ROWS, VIDEO_ROWS, HEAD_DIM = 226, 1801, 64   # 2,027 rows: not a multiple of the 64-row block


def joint_inputs(heads: int, generator: torch.Generator, k_mean: float = 0.0):
    """A fused QKV projection output (1, S, 3 * heads * 64) with QK-norm weights and RoPE tables, as a
    CogVideoX block feeds its attention; k_mean: the QK norm's bias of K, in standard deviations."""
    rows = TEXT_ROWS + VIDEO_ROWS
    qkv = torch.randn(1, rows, 3 * heads * HEAD_DIM, generator=generator)
    q_weight, k_weight = (1 + 0.2 * torch.randn(HEAD_DIM, generator=generator) for _ in range(2))
    q_bias = 0.1 * torch.randn(HEAD_DIM, generator=generator)
    k_bias = k_mean * torch.randn(HEAD_DIM, generator=generator).sign()
    angles = torch.randn(VIDEO_ROWS, HEAD_DIM // 2, generator=generator) * 3
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    return qkv, heads, q_weight, q_bias, k_weight, k_bias, 1e-6, cos, sin, TEXT_ROWS


def joint(inputs, attend=None) -> torch.Tensor:
    return joint_attention(*inputs, attend=attend)


def per_tensor_fp8_attention(q, k, v, scale=None):
    """The counterexample (FA3-FP8's granularity): Q and K in e4m3 with one scale per tensor, no
    smoothing, the rest exact."""
    def e4m3(x):
        step = x.abs().amax() / quantized.E4M3_MAX
        return (x / step).to(torch.float8_e4m3fn).float() * step
    return attention(e4m3(q.float()), e4m3(k.float()), v.float(), scale)


def test_e4m3_rms_matches_its_derivation():
    """The constant the bounds rest on, measured: e4m3 rounding of log-uniform values."""
    x = torch.exp(torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 8 - 4)
    rounded = x.to(torch.float8_e4m3fn).float()
    assert abs(((rounded - x) / x).pow(2).mean().sqrt().item() - E4M3_RMS) < 0.001


def test_quantizers_map_each_group_to_the_full_range_and_round_to_nearest():
    x = torch.randn(3, 70, 130) * torch.logspace(-3, 3, 70)[:, None]  # rows of very different sizes
    rows, scale = quantized.quantize_rows(x)
    assert rows.dtype == torch.float8_e4m3fn and scale.shape == (3, 70, 1)
    assert torch.equal(rows.float().abs().amax(-1), torch.full((3, 70), quantized.E4M3_MAX))
    # Round to nearest: within half a step, 2^-4 of the value (3 mantissa bits), or half the
    # subnormal spacing 2^-9 of the scale.
    assert ((rows.float() * scale - x).abs() <= 2 ** -4 * x.abs() + 2 ** -10 * scale).all()
    blocks, block_scale = quantized.quantize_int8_blocks(x.view(1, 3, 70, 130))
    assert blocks.dtype == torch.int8 and block_scale.shape == (1, 3, 2)  # 70 rows: blocks of 64 and 6
    assert blocks[0, :, :64].abs().amax(dim=(1, 2)).eq(127).all() and blocks[0, :, 64:].abs().amax(dim=(1, 2)).eq(127).all()
    step = block_scale.repeat_interleave(quantized.BLOCK, -1)[..., :70, None]
    assert ((blocks.float() * step - x.view(1, 3, 70, 130)).abs() <= step * (0.5 + 1e-6)).all()


def test_attention_emulation_within_the_fp8_bound_of_fp32():
    inputs = joint_inputs(2, torch.Generator().manual_seed(1))
    err = rel_l2(joint(inputs, quantized.quantized_attention), joint(inputs))
    assert E4M3_RMS < err < ATTENTION_BOUND  # below E4M3_RMS: P and V were not rounded to e4m3


def test_k_smoothing_survives_a_k_mean_of_ten_sigma_where_per_tensor_fp8_fails():
    """K as attention sees it (after the QK norm and RoPE) with a per-channel mean of 10 standard
    deviations."""
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, TEXT_ROWS + VIDEO_ROWS, HEAD_DIM, generator=generator) for _ in range(3))
    k = k + 10 * torch.randn(1, 2, 1, HEAD_DIM, generator=generator).sign()
    exact = attention(q, k, v)
    assert rel_l2(quantized.quantized_attention(q, k, v), exact) < ATTENTION_BOUND
    assert rel_l2(per_tensor_fp8_attention(q, k, v), exact) > 2 * ATTENTION_BOUND


def test_triton_8bit_attention_equals_its_emulation(monkeypatch):
    """The kernel (under TRITON_INTERPRET=1 without a GPU) against the emulation: same scales, same
    roundings, fp32 sums in another order."""
    require("triton")
    from cvfast.kernels import quantized_attention as kernel
    poison_outputs(monkeypatch, kernel)
    inputs = joint_inputs(1, torch.Generator().manual_seed(3), k_mean=3.0)
    assert rel_l2(joint(inputs, quantized.triton_quantized_attention), joint(inputs, quantized.quantized_attention)) < 1e-5


def test_fp8_linear_emulation_within_the_fp8_bound_of_fp32():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 77, 200, generator=generator) * (1 + 5 * torch.rand(3, 77, 1, generator=generator))
    linear = torch.nn.Linear(200, 333)
    exact = linear(x)
    err = rel_l2(FP8Linear(linear, quantized.quantized(cvfast.ops.OpSet(), "fp8-linear", torch.device("cpu")))(x), exact)
    assert E4M3_RMS < err < LINEAR_BOUND  # below E4M3_RMS: x and W were not rounded to e4m3


@pytest.mark.parametrize("variant", ["2b", "5b", "1.5"])
def test_fp8_forward_agrees_with_the_fp32_reference(variant):
    folder = tiny_folder(variant)
    reference = cvfast.load(folder, backend="reference")
    fp8 = cvfast.load(folder, precision="fp8")
    report = compare(reference, fp8, "a red boat", num_inference_steps=2, num_frames=TINY_FRAMES, height=TINY_HEIGHT,
                     width=TINY_WIDTH)
    assert report["output"]["cosine"] >= 0.99 and report["passed"]
    assert report["output"]["rel_l2"] > 0  # the candidate was quantized
    assert fp8.backends()["fp8_linear"] == "fp8-emulated" and fp8.backends()["joint_attention"] == "int8-emulated"
    assert report["weights"]["candidate_bytes"] < report["weights"]["reference_bytes"]


def test_each_precision_quantizes_only_its_part():
    linear_only = cvfast.load("tiny", precision="fp8-linear")
    attention_only = cvfast.load("tiny", precision="fp8-attention")
    assert isinstance(linear_only.transformer.blocks[0].ff1, FP8Linear)
    assert linear_only.backends()["joint_attention"] == "sdpa"
    assert "fp8_linear" not in attention_only.backends()
    assert attention_only.backends()["joint_attention"] == "int8-emulated"
    assert not any(isinstance(m, FP8Linear) for m in attention_only.transformer.modules())
    assert "fp8_linear" not in cvfast.load("tiny").backends()


def test_the_gate_fails_a_model_that_disagrees():
    reference, candidate = cvfast.load("tiny"), cvfast.load("tiny")
    with torch.no_grad():
        candidate.transformer.proj_out.weight.add_(torch.randn_like(candidate.transformer.proj_out.weight))
    assert not compare(reference, candidate, "a red boat", num_inference_steps=2)["passed"]


def test_check_precision_command_reports_and_writes(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["check-precision", "tiny", "--precision", "fp8", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed and "transformer weights" in printed
    report = json.loads(out.read_text())
    assert report["precision"] == "fp8" and len(report["blocks"]) == 2 and report["passed"]


@pytest.mark.parametrize("arguments, named", [
    (dict(precision="int4"), "precision"),
    (dict(precision="fp8", backend="tensorrt", engine="x.engine"), "precision"),
])
def test_bad_precision_is_named(arguments, named):
    with pytest.raises(CVFastInputError, match=named):
        cvfast.load("tiny", **arguments)


def test_no_lora_into_fp8_weights(tmp_path):
    lora = tmp_path / "adapter.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(CVFastInputError, match="lora.*precision='fp8'"):
        cvfast.generate("a red boat", loras=[(lora, 1.0)], precision="fp8", out=None)
    with pytest.raises(CVFastInputError, match="FP8 weights"):
        cvfast.load("tiny", precision="fp8-linear").load_lora(lora)


def test_cli_refuses_an_unknown_precision(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "x", "--precision", "int4"])
    assert exit_info.value.code == 2 and "--precision" in capsys.readouterr().err


def test_backend_triton_runs_the_8bit_attention_kernel():
    """backend="triton" puts the kernel first (on the CPU under TRITON_INTERPRET=1); its generation
    stays within the attention's own bound of the unquantized Triton run (the residual stream carries
    the attention's error diluted)."""
    require("triton")
    kw = dict(num_inference_steps=2, seed=3, output_type="latent", progress=False)
    kernel = cvfast.load("tiny", backend="triton", precision="fp8-attention")
    got = kernel.generate("a red boat", **kw).frames
    assert kernel.backends()["joint_attention"] == "triton-int8"
    assert 0 < rel_l2(got, cvfast.load("tiny", backend="triton").generate("a red boat", **kw).frames) < ATTENTION_BOUND


@pytest.mark.parametrize("variant, ratio", [("5b", 0.573), ("2b", 0.608)])
def test_fp8_weight_memory_at_real_sizes(variant, ratio):
    """The README's figure, counted on the real architecture (built on the meta device): the four
    quantized matrices are 85 % (5B) and 78 % (2B) of the parameters; their bytes halve."""
    from cvfast.models.config import PRESETS
    from cvfast.models.fp8 import quantize_linears, weight_bytes
    from cvfast.models.transformer import CogVideoXTransformer
    with torch.device("meta"):
        model = CogVideoXTransformer(PRESETS[variant]).to(torch.bfloat16)
        bf16 = weight_bytes(model)
        quantize_linears(model)
    assert weight_bytes(model) / bf16 == pytest.approx(ratio, abs=0.001)


def test_no_onnx_export_of_fp8_weights(tmp_path):
    with pytest.raises(CVFastInputError, match="precision='bf16', not 'fp8'"):
        cvfast.export_onnx(cvfast.load("tiny", precision="fp8"), tmp_path, frames=9, height=64, width=96)
    assert not any(tmp_path.iterdir())
