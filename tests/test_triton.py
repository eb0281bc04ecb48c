"""The Triton kernels against the reference ops, and the dispatcher around them.

Without a GPU they run under TRITON_INTERPRET=1 (set in conftest.py). Fresh random inputs at odd
sizes (sequence lengths that are not multiples of the block: 97, 226 + 150; widths that are not
powers of two); every kernel output is allocated NaN-filled (`poisoned`) so an element a kernel
fails to write fails the test. Tolerance, as FlashAttention's tests state it: in bf16/fp16 the
kernel's max error against the fp32 reference is at most twice the error of PyTorch doing the
same math in that dtype; in fp32 the kernel must agree to fp32 rounding.
"""
import importlib
import logging
import types

import pytest
import torch

from cvfast import ops
from cvfast.core.errors import CVFastInputError
from cvfast.ops import adaln, mlp
from cvfast.ops import joint_attention as attn
from cvfast.ops.registry import placeholder, reference_impl
from tests.numerics import DEVICE, check, fp32, naive_attention, poison_outputs
from tests.extras import require

require("triton")
from cvfast.kernels import attention as attention_kernel  # noqa: E402
from cvfast.kernels import gelu as gelu_kernel  # noqa: E402
from cvfast.kernels import norms as norms_kernel  # noqa: E402


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output starts as NaN."""
    poison_outputs(monkeypatch, attention_kernel, norms_kernel, gelu_kernel)


def rope_tables(rows, head_dim):
    angles = torch.randn(rows, head_dim // 2, device=DEVICE) * 3
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,seq,head_dim", [(1, 2, 97, 64), (2, 2, 226 + 150, 128), (2, 1, 5, 64)])
def test_attention(poisoned, dtype, batch, heads, seq, head_dim):
    torch.manual_seed(seq + head_dim)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=DEVICE, dtype=dtype) for _ in range(3))
    got = attn.triton_attention(q, k, v)
    check(got, attn.attention(*fp32(q, k, v)), naive_attention(q, k, v))


def test_attention_strided_inputs_and_scale(poisoned):
    """q, k, v as views of a (B, S, H, d) layout, a query count unlike the key count, a given scale."""
    torch.manual_seed(3)
    q = torch.randn(2, 45, 3, 64, device=DEVICE).transpose(1, 2)
    k, v = (torch.randn(2, 70, 3, 64, device=DEVICE).transpose(1, 2) for _ in range(2))
    check(attn.triton_attention(q, k, v, scale=0.3), attn.attention(q, k, v, scale=0.3))


def joint_inputs(batch, n_text, n_video, heads, head_dim, dtype, rope):
    qkv = torch.randn(batch, n_text + n_video, 3 * heads * head_dim, device=DEVICE, dtype=dtype)
    norm = [torch.randn(head_dim, device=DEVICE, dtype=dtype) * 0.5 + 1 if i % 2 == 0 else
            torch.randn(head_dim, device=DEVICE, dtype=dtype) * 0.2 for i in range(4)]
    cos, sin = rope_tables(n_video, head_dim) if rope else (None, None)
    return qkv, (heads, *norm, 1e-6, cos, sin, n_text)


# The redesigned joint attention (the prepare pass, then the attention kernel) at the sizes:
# S = 97 (40 text + 57 video rows) and 226 + 150, d = 64 and 128, batch 1 and 2, bf16 and fp32.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_text,n_video", [(40, 57), (226, 150)])
def test_joint_attention_meets_the_flash_attention_rule(poisoned, dtype, batch, head_dim, n_text, n_video):
    torch.manual_seed(batch * head_dim + n_video)
    qkv, args = joint_inputs(batch, n_text, n_video, 2, head_dim, dtype, rope=True)
    got = attn.joint_attention_op(qkv, *args)
    exact = attn.joint_attention(*fp32(qkv, *args))
    check(got, exact, attn.joint_attention(qkv, *args, attend=naive_attention))


def test_joint_attention_without_rope(poisoned):
    torch.manual_seed(5)
    qkv, args = joint_inputs(2, 226, 150, 2, 64, torch.bfloat16, rope=False)
    check(attn.joint_attention_op(qkv, *args), attn.joint_attention(*fp32(qkv, *args)),
          attn.joint_attention(qkv, *args, attend=naive_attention))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepare_pass_equals_the_reference_norm_and_rope(poisoned, dtype):
    """q and k normed and rotated, v copied, each rounded once to the dtype: as the reference does it
    in fp32 then rounds (to fp32 rounding; in bf16 within one bf16 rounding)."""
    torch.manual_seed(6)
    heads, head_dim, n_text, n_video = 3, 64, 40, 57
    qkv, (_, qw, qb, kw, kb, eps, cos, sin, _) = joint_inputs(2, n_text, n_video, heads, head_dim, dtype, rope=True)
    q, k, v = attention_kernel.prepare_qkv(qkv, heads, (qw, qb, kw, kb, eps), (cos, sin), n_text)
    rq, rk, rv = fp32(*qkv.view(2, n_text + n_video, 3, heads, head_dim).permute(2, 0, 3, 1, 4))
    rotate = lambda x: torch.cat((x[:, :, :n_text], attn.rope(x[:, :, n_text:], cos, sin)), dim=2)  # noqa: E731
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    for got, want in ((q, rotate(attn.layer_norm(rq, *fp32(qw, qb), eps))), (k, rotate(attn.layer_norm(rk, *fp32(kw, kb), eps)))):
        assert got.is_contiguous() and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert torch.equal(v, rv.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_pass_equals_the_fused_prologue_bit_for_bit(poisoned, dtype):
    """Same roundings (q and k to the dtype before the dot), same tiles under the interpreter: the
    redesign changes where the norm and RoPE run, not the result."""
    torch.manual_seed(7)
    qkv, (heads, qw, qb, kw, kb, eps, cos, sin, n_text) = joint_inputs(2, 226, 150, 2, 64, dtype, rope=True)
    norm, rope = (qw, qb, kw, kb, eps), (cos.contiguous(), sin.contiguous())
    assert torch.equal(attention_kernel.joint_attention(qkv, heads, norm, rope, n_text),
                       attention_kernel.joint_attention_fused(qkv, heads, norm, rope, n_text))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_text,n_video", [(40, 57), (226, 150)])
def test_tensor_descriptor_loads_equal_pointer_loads_bit_for_bit(poisoned, dtype, n_text, n_video):
    """K and V through tensor descriptors (TMA on a GPU): same tiles, same arithmetic. The last key
    block of each head reads into the next head's rows (97 and 376 are not multiples of 64) and, for
    the last head, past the tensor: masked, they must change nothing."""
    torch.manual_seed(n_video)
    qkv, (heads, qw, qb, kw, kb, eps, cos, sin, n_text) = joint_inputs(2, n_text, n_video, 3, 64, dtype, rope=True)
    norm, rope = (qw, qb, kw, kb, eps), (cos.contiguous(), sin.contiguous())
    assert torch.equal(attention_kernel.joint_attention_tma(qkv, heads, norm, rope, n_text),
                       attention_kernel.joint_attention(qkv, heads, norm, rope, n_text))


def modulation(batch, groups, dim, dtype):
    return (torch.randn(batch, groups, dim, device=DEVICE, dtype=dtype) * 0.5 for _ in range(3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,dim,groups", [(1, 97, 200, 2), (2, 226 + 150, 96, 2), (2, 33, 72, 1)])
def test_modulate_and_gated_residual(poisoned, dtype, batch, seq, dim, groups):
    torch.manual_seed(seq + dim)
    h, y = (torch.randn(batch, seq, dim, device=DEVICE, dtype=dtype) for _ in range(2))
    w, b = torch.randn(dim, device=DEVICE, dtype=dtype), torch.randn(dim, device=DEVICE, dtype=dtype)
    shift, scale, gate = modulation(batch, groups, dim, dtype)
    n_text = min(seq - 1, 226) if groups == 2 else 0
    mod_args = (w, b, shift, scale, n_text, 1e-5)
    check(adaln.triton_modulate(h, *mod_args), adaln.modulate(*fp32(h, *mod_args)), adaln.modulate(h, *mod_args))
    check(adaln.triton_gated_residual(h, y, gate, n_text), adaln.gated_residual(*fp32(h, y, gate, n_text)),
          adaln.gated_residual(h, y, gate, n_text))
    both = (h, y, gate, *mod_args)
    check(adaln.triton_gated_residual_modulate(*both), adaln.gated_residual_modulate(*fp32(*both)),
          adaln.gated_residual_modulate(*both))
    check(adaln.triton_layer_norm(h, w, b, 1e-5), attn.layer_norm(*fp32(h, w, b), 1e-5),
          attn.layer_norm(h, w, b, 1e-5))


def test_modulation_chunks_of_a_linear_output_need_no_copy(poisoned):
    """The block passes shift/scale as strided chunks of one (B, 1, 6D) tensor."""
    torch.manual_seed(8)
    h = torch.randn(2, 21, 40, device=DEVICE)
    shift, scale, _ = torch.randn(2, 1, 120, device=DEVICE).chunk(3, dim=2)
    check(adaln.triton_modulate(h, None, None, shift, scale, 0, 1e-6),
          adaln.modulate(h, None, None, shift, scale, 0, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_mlp(poisoned, dtype):
    torch.manual_seed(9)
    x = torch.randn(2, 97, 40, device=DEVICE, dtype=dtype)
    w1, w2 = (torch.randn(*s, device=DEVICE, dtype=dtype) * 0.2 for s in ((150, 40), (40, 150)))
    b1, b2 = (torch.randn(n, device=DEVICE, dtype=dtype) for n in (150, 40))
    args = (x, w1, b1, w2, b2)
    check(mlp.triton_gelu_mlp(*args), mlp.gelu_mlp(*fp32(*args)), mlp.gelu_mlp(*args))


def test_poisoning_catches_an_unwritten_element(poisoned, monkeypatch):
    """The check above would fail a kernel that skipped its last rows: the launcher's grid is one
    program short (the launcher sizes it with `triton.cdiv`)."""
    one_short = types.SimpleNamespace(cdiv=lambda n, block: -(-n // block) - 1)
    monkeypatch.setattr(norms_kernel, "triton", one_short)
    h = torch.randn(1, 40, 24, device=DEVICE)
    with pytest.raises(AssertionError, match="unwritten"):
        check(adaln.triton_layer_norm(h, None, None, 1e-5), attn.layer_norm(h, None, None, 1e-5))


# -- dispatch -------------------------------------------------------------------------------------

def test_required_backend_lists_why_it_cannot_take_an_input():
    opset = ops.resolve("triton", DEVICE)
    q = torch.randn(1, 2, 10, 80, device=DEVICE)
    with pytest.raises(CVFastInputError, match=r"backend='triton': attention cannot take .*head_dim 80"):
        opset.attention(q, q, q)
    with pytest.raises(CVFastInputError, match="head_dim 80"):
        ops.attention(q, q, q, backend="triton")


def test_auto_falls_back_per_shape_with_one_warning(caplog):
    impl = ops.alternatives("attention")
    triton_impl = next(i for i in impl if i.backend == "triton")
    opset = ops.OpSet({"attention": [triton_impl, reference_impl("attention")]})
    q80, q64 = torch.randn(1, 2, 10, 80, device=DEVICE), torch.randn(1, 2, 10, 64, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="cvfast"):
        for _ in range(2):
            torch.testing.assert_close(opset.attention(q80, q80, q80), attn.attention(q80, q80, q80))
        opset.attention(q64, q64, q64)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "instead of triton" in warnings[0] and "head_dim 80" in warnings[0]
    assert opset.names()["attention"] == "reference+triton"


def test_a_backend_that_fails_to_import_says_why(monkeypatch, caplog):
    with pytest.raises(ModuleNotFoundError) as info:
        importlib.import_module("cvfast.ops.no_such_backend_module")
    broken = placeholder("triton", info.value)
    reasons = broken.device_reasons(torch.device(DEVICE))
    assert len(reasons) == 1 and "triton is unavailable (ModuleNotFoundError" in reasons[0]
    monkeypatch.setattr(ops, "alternatives", lambda op: [broken] if op in ("attention", "modulate") else [])
    monkeypatch.setitem(ops.AUTO_ORDER, torch.device(DEVICE).type, ("triton",))
    with caplog.at_level(logging.WARNING, logger="cvfast"):
        names = ops.resolve("auto", DEVICE).names()
    assert names["attention"] == names["modulate"] == "reference"
    assert len(caplog.records) == 1 and "ModuleNotFoundError" in caplog.records[0].getMessage()
    with pytest.raises(CVFastInputError, match="ModuleNotFoundError"):
        ops.resolve("triton", DEVICE)


def test_custom_ops_have_fake_implementations():
    """torch.compile / export / graph capture see one op with the right output shape."""
    with torch.device("meta"):
        qkv = torch.empty(2, 30, 3 * 2 * 64)
        w = torch.empty(64)
        out = torch.ops.cvfast.joint_attention(qkv, 2, w, w, w, w, 1e-6, None, None, 10)
        h = torch.empty(2, 30, 96)
        g = torch.empty(2, 2, 96)
        new_h, normed = torch.ops.cvfast.residual_norm(h, h, g, None, None, g, g, 10, 1e-5, True)
    assert out.shape == (2, 30, 128) and new_h.shape == normed.shape == h.shape
    torch.library.opcheck(torch.ops.cvfast.attention.default,
                          tuple(torch.randn(1, 1, 9, 16, device=DEVICE) for _ in range(3)) + (0.25,))


# -- the fast model path --------------------------------------------------------------------------

FAST_OPS = ("joint_attention", "modulate", "gated_residual_modulate", "gated_residual", "layer_norm", "gelu_mlp",
            "group_norm", "causal_conv3d")


# One case decodes to frames through the Triton VAE kernels; the others compare the denoised latents
# (the VAE kernels' own decode test is tests/test_vae_kernels.py): under the interpreter a Triton
# decode costs ~40 s here, the transformer a few seconds.
@pytest.mark.parametrize("variant,scheduler,output", [("2b", "ddim", "latent"), ("5b", "dpm", "latent"),
                                                      ("1.5", "ddim", "np"), ("1.5-i2v", "ddim", "latent")])
def test_generate_with_triton_matches_reference(variant, scheduler, output):
    """fp32: the pipeline through the Triton kernels equals the reference backend's frames (latents)."""
    import numpy as np

    import cvfast
    from tests.fixtures import tiny_folder
    folder = tiny_folder(variant, scheduler)
    kw = dict(num_frames=9, height=32, width=48, num_inference_steps=2, guidance_scale=6.0, seed=7,
              progress=False, max_sequence_length=16, output_type=output)
    if variant == "1.5-i2v":  # an image to animate (its VAE encode runs through the kernels too)
        kw.update(image=np.full((32, 48, 3), 128, np.uint8), allow_untrained_size=True)
    results = {}
    for backend in ("reference", "triton"):
        pipe = cvfast.load(folder, device=DEVICE, dtype=torch.float32, backend=backend)
        results[backend] = pipe.generate("a boat on a lake", **kw).frames
    used = pipe.backends()
    assert all(used[op] == "triton" for op in FAST_OPS), used
    ref, fast = (np.asarray(results[b], np.float64) for b in ("reference", "triton"))
    assert np.isfinite(fast).all()
    assert np.linalg.norm(fast - ref) / np.linalg.norm(ref) < 1e-4


def test_auto_passes_over_a_kernel_that_fails_on_its_first_run(caplog):
    """A kernel that fails to compile on a device falls back (auto) with one line, and is not retried."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PTX assembly aborted\nmore detail")
    opset = ops.OpSet({"modulate": [ops.Impl("triton", broken), reference_impl("modulate")]})
    h, shift = torch.randn(1, 5, 8), torch.randn(1, 1, 8)
    with caplog.at_level(logging.WARNING, logger="cvfast"):
        for _ in range(2):
            got = opset.modulate(h, None, None, shift, shift, 0, 1e-5)
    torch.testing.assert_close(got, adaln.modulate(h, None, None, shift, shift, 0, 1e-5))
    assert len(calls) == 1 and len(caplog.records) == 1
    assert "failed on its first run: RuntimeError: PTX assembly aborted" in caplog.records[0].getMessage()
    required = ops.OpSet({"modulate": ops.Impl("triton", broken)}, required="triton")
    with pytest.raises(RuntimeError, match="PTX"):
        required.modulate(h, None, None, shift, shift, 0, 1e-5)


@pytest.mark.parametrize("backend,module", [("sageattention", "sageattention"), ("flash_attn_4", "flash_attn")])
def test_opt_in_attention_backends_are_named_and_say_why_they_cannot_run_here(backend, module):
    """Opt-in only: never under "auto"; asked for by name where it cannot run, the error says why."""
    assert backend not in {b for order in ops.AUTO_ORDER.values() for b in order}
    with pytest.raises(CVFastInputError, match=rf"backend='{backend}' is not accepted: attention cannot use it on "
                                               rf"cpu: ({backend} is unavailable .*No module named '{module}|runs on "
                                               r"cuda, not cpu)"):
        ops.resolve(backend, "cpu")


def test_sage_wrapper_smooths_k_out_of_place(monkeypatch):
    """sageattn's own K smoothing subtracts the mean from the caller's k in place; the wrapper
    subtracts it on a copy (softmax is invariant to it) and turns sageattn's off."""
    calls = {}

    def fake_sageattn(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k):
        calls.update(layout=tensor_layout, causal=is_causal, smooth_k=smooth_k, k_mean=k.mean(dim=2).abs().max())
        return attn.attention(q, k, v, sm_scale)
    monkeypatch.setattr(attn, "sageattn", fake_sageattn)
    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 3, 41, 64) for _ in range(3))
    k = k + 5
    k_before = k.clone()
    got = attn.sage_attention(q, k, v, scale=0.2)
    assert torch.equal(k, k_before)
    assert calls["layout"] == "HND" and calls["causal"] is False and calls["smooth_k"] is False
    assert calls["k_mean"] < 1e-5
    torch.testing.assert_close(got, attn.attention(q, k, v, 0.2), rtol=1e-5, atol=1e-5)
