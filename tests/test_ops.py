"""The reference ops against independent formulations, and the SDPA backend against the reference.

Fresh random inputs at odd sizes; results must be finite. Low-precision tolerance follows
FlashAttention's tests: a backend's error against the fp32 reference is at most twice PyTorch's own
error for the same math done naively in that dtype.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cvfast import ops
from cvfast.ops import adaln, causal_conv3d, group_norm, mlp
from cvfast.ops import joint_attention as attn
from cvfast.ops.cost import op_cost
from cvfast.ops.registry import reference, register
from tests.numerics import naive_attention, within_twice_pytorch


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 37, 16), (1, 2, 131, 64)])
def test_reference_attention_blocks_cover_every_query(monkeypatch, shape):
    monkeypatch.setattr(attn, "QUERY_BLOCK", 7)  # odd block size: ragged last block
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    out = attn.attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, naive_attention(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 77, 64), (1, 2, 1000, 16)])
def test_sdpa_backend_within_twice_pytorch_error(dtype, shape):
    torch.manual_seed(shape[2])
    q, k, v = (torch.randn(shape) for _ in range(3))
    exact = attn.attention(q, k, v)  # fp32
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    got = attn.sdpa_attention(qd, kd, vd)
    assert got.dtype == dtype and torch.isfinite(got).all()
    within_twice_pytorch(got, exact, naive_attention(qd, kd, vd))


def test_sdpa_kernel_priority_compiles_into_one_graph(monkeypatch):
    """The Hopper preference (cuDNN first) is set inside the op; torch.compile must keep it in the
    graph (fullgraph: no break) and give eager's result. On this CPU the preference is forced; the
    order lists every kernel, so the CPU's own still runs."""
    assert attn.sdpa_priority(torch.device("cpu")) is None  # PyTorch's own order off CUDA
    hopper = attn.SDPA_PRIORITY_BY_ARCH[9]
    monkeypatch.setattr(attn, "sdpa_priority", lambda device: hopper)
    assert attn.sdpa_priority(torch.device("cpu")) is hopper
    torch.manual_seed(9)
    q, k, v = (torch.randn(1, 3, 45, 64) for _ in range(3))
    compiled = torch.compile(attn.sdpa_attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, 0.3), attn.sdpa_attention(q, k, v, 0.3), rtol=0, atol=0)
    torch.testing.assert_close(attn.sdpa_attention(q, k, v, 0.3), attn.attention(q, k, v, 0.3))


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 12)
    angles = torch.randn(11, 6)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    got = attn.rope(x, cos, sin)
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.polar(
        torch.ones_like(angles), angles)).flatten(-2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _row_norm(x, w, b, eps):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


@pytest.mark.parametrize("groups", [1, 2])
def test_modulate_per_segment(groups):
    torch.manual_seed(1)
    x, w, b = torch.randn(2, 9, 24), torch.randn(24), torch.randn(24)
    shift, scale = torch.randn(2, groups, 24), torch.randn(2, groups, 24)
    n_text = 4
    expected = torch.empty_like(x)
    for row in range(9):  # row by row: text rows take entry 0, video rows the last entry
        seg = 0 if row < n_text else groups - 1
        expected[:, row] = _row_norm(x[:, row], w, b, 1e-5) * (1 + scale[:, seg]) + shift[:, seg]
    got = adaln.modulate(x, w, b, shift, scale, n_text, 1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gated_residual_modulate_adds_then_normalises():
    torch.manual_seed(5)
    h, y, w, b = torch.randn(2, 7, 16), torch.randn(2, 7, 16), torch.randn(16), torch.randn(16)
    gate, shift, scale = torch.randn(2, 2, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    new_h, normed = adaln.gated_residual_modulate(h, y, gate, w, b, shift, scale, 3, 1e-6)
    expected_h = torch.cat((h[:, :3] + gate[:, :1] * y[:, :3], h[:, 3:] + gate[:, 1:] * y[:, 3:]), dim=1)
    torch.testing.assert_close(new_h, expected_h)
    torch.testing.assert_close(normed, adaln.modulate(expected_h, w, b, shift, scale, 3, 1e-6))
    torch.testing.assert_close(adaln.gated_residual(h, y, gate, 3), expected_h)


def test_joint_attention_is_norm_rope_attention():
    torch.manual_seed(6)
    batch, seq, heads, d, n_text = 2, 11, 3, 8, 4
    qkv = torch.randn(batch, seq, 3 * heads * d, dtype=torch.float64)
    w, b = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    angles = torch.randn(seq - n_text, d // 2, dtype=torch.float64)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    got = attn.joint_attention(qkv, heads, w, b, w * 2, b, 1e-6, cos, sin, n_text)
    q, k, v = qkv.view(batch, seq, 3, heads, d).unbind(2)   # (B, S, H, d) each
    q, k = _row_norm(q, w, b, 1e-6), _row_norm(k, 2 * w, b, 1e-6)
    rot = lambda x: torch.cat((x[:, :n_text], attn.rope(x[:, n_text:].transpose(1, 2), cos, sin).transpose(1, 2)), 1)  # noqa: E731
    expected = naive_attention(rot(q).transpose(1, 2), rot(k).transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(batch, seq, -1))


def test_gelu_mlp_uses_tanh_gelu():
    torch.manual_seed(2)
    x, w1, b1, w2, b2 = torch.randn(3, 7, 10), torch.randn(13, 10), torch.randn(13), torch.randn(10, 13), torch.randn(10)
    h = x @ w1.T + b1
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    torch.testing.assert_close(mlp.gelu_mlp(x, w1, b1, w2, b2), gelu @ w2.T + b2, rtol=1e-5, atol=1e-4)


def test_group_norm_spatial_silu():
    torch.manual_seed(3)
    x = torch.randn(2, 6, 3, 5, 7)
    w, b, scale, shift = torch.randn(6), torch.randn(6), torch.randn_like(x), torch.randn_like(x)
    groups = x.reshape(2, 3, -1)
    normed = ((groups - groups.mean(-1, keepdim=True)) / torch.sqrt(groups.var(-1, unbiased=False, keepdim=True)
              + 1e-6)).reshape_as(x) * w[:, None, None, None] + b[:, None, None, None]
    expected = F.silu(normed * scale + shift)
    got = group_norm.group_norm(x, w, b, 3, 1e-6, scale=scale, shift=shift, silu=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_causal_conv3d_pads_with_first_frame_and_cache():
    torch.manual_seed(4)
    x, w, bias = torch.randn(1, 3, 5, 6, 7), torch.randn(4, 3, 3, 3, 3), torch.randn(4)
    padded = torch.cat((x[:, :, :1], x[:, :, :1], x), dim=2)
    expected = F.conv3d(padded, w, bias, padding=(0, 1, 1))
    torch.testing.assert_close(causal_conv3d.causal_conv3d(x, w, bias, None), expected)
    second = causal_conv3d.causal_conv3d(x[:, :, 3:], w, bias, x[:, :, 1:3])
    torch.testing.assert_close(second, expected[:, :, 3:])


def test_every_op_registers_once_in_a_fixed_order():
    assert ops.OP_NAMES == ("attention", "joint_attention", "rope", "layer_norm", "modulate", "gated_residual",
                            "gated_residual_modulate", "gelu_mlp", "group_norm", "causal_conv3d", "spatial_norm")
    assert all(callable(reference(op)) for op in ops.OP_NAMES)
    with pytest.raises(RuntimeError, match="registered twice"):
        register("attention", attn.attention)


def test_resolve_per_backend():
    assert set(ops.resolve("reference", "cpu").names().values()) == {"reference"}
    auto = ops.resolve("auto", "cpu").names()
    assert auto["attention"] == auto["joint_attention"] == "sdpa" and auto["modulate"] == "reference"
    assert ops.resolve("sdpa", "cpu").names()["joint_attention"] == "sdpa"


@pytest.mark.parametrize("op,make_args", [
    ("attention", lambda: [torch.randn(2, 3, 37, 16) for _ in range(3)]),
    ("joint_attention", lambda: [torch.randn(2, 19, 3 * 2 * 8), 2, None, None, None, None, 1e-6, None, None, 5]),
    ("gelu_mlp", lambda: [torch.randn(2, 7, 12), torch.randn(48, 12), torch.randn(48), torch.randn(12, 48), None]),
    ("causal_conv3d", lambda: [torch.randn(1, 4, 3, 6, 5), torch.randn(5, 4, 3, 3, 3), None, None]),
])
def test_op_cost_counts_what_pytorch_counts(op, make_args):
    """FLOPs from the cost model equal torch's own FLOP counter on the reference; bytes are each
    input read once plus the output written once."""
    args = make_args()
    with FlopCounterMode(display=False) as counter:
        out = reference(op)(*args)
    cost = op_cost(op, tuple(args), {}, out)
    assert cost.flops == counter.get_total_flops() > 0
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    assert cost.bytes == 4 * (sum(t.numel() for t in tensors) + out.numel())
