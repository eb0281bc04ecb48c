"""Checks that need a CUDA device; skipped elsewhere. The `gpu` benchmark suite runs this file first.

They hold the CUDA path to the CPU oracle: fp32 (TF32 off) equal to the CPU run to rounding, and in
bf16 each stage within twice the error bf16 itself makes on the CPU (FlashAttention's rule applied
to whole stages)."""
import shutil

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import cvfast
from cvfast import ops
from cvfast.ops import adaln, spatial_norm
from cvfast.ops import causal_conv3d as conv
from cvfast.ops import group_norm as gn
from cvfast.ops import joint_attention as attn
from cvfast.ops.triton_backend import kernels  # None without triton: the Triton tests require it first
from tests.numerics import check, fp32, naive_attention, rel_l2, within_twice_pytorch
from tests.extras import require

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_defaults_on_cuda_are_cuda_bf16():
    pipe = cvfast.load("tiny")
    assert pipe.device.type == "cuda" and pipe.dtype == torch.bfloat16
    assert pipe.backends()["attention"] == "sdpa"


def test_tiny_fp32_on_cuda_equals_cpu():
    kw = dict(num_inference_steps=4, seed=0, progress=False)
    cpu = cvfast.load("tiny", device="cpu").generate("a red boat", **kw).frames
    gpu = cvfast.load("tiny", device="cuda", dtype=torch.float32).generate("a red boat", **kw).frames
    assert torch.isfinite(torch.from_numpy(gpu)).all()
    assert rel_l2(torch.from_numpy(gpu), torch.from_numpy(cpu)) < 1e-5


def test_bf16_stages_within_twice_bf16_own_error():
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 3, 4, 8, 12, generator=gen), torch.randn(2, 226, 32, generator=gen)
    z, t = torch.randn(1, 4, 3, 8, 12, generator=gen), torch.tensor([999, 500])
    f32 = cvfast.load("tiny", device="cpu")
    cpu16 = cvfast.load("tiny", device="cpu", dtype=torch.bfloat16)
    gpu16 = cvfast.load("tiny", device="cuda", dtype=torch.bfloat16)

    def stages(pipe, dtype):
        dev = pipe.device
        with torch.no_grad():
            v = pipe.transformer(x.to(dev, dtype), text.to(dev, dtype), t.to(dev),
                                 pipe.transformer.position_tables(3, 8, 12, dev))
            img = pipe.vae.decode(z.to(dev, dtype))
        return pipe.text_encoder.encode(["a red boat"], 226, dev, dtype), v, img

    exact, own, got = stages(f32, torch.float32), stages(cpu16, torch.bfloat16), stages(gpu16, torch.bfloat16)
    for name, e, o, g in zip(("text", "transformer", "vae"), exact, own, got):
        assert torch.isfinite(g).all(), name
        assert rel_l2(g, e) <= 2 * rel_l2(o, e) + 1e-3, name


@pytest.mark.parametrize("heads,seq", [(48, 17776), (30, 4001), (3, 333)])
def test_sdpa_at_cogvideox_sizes(heads, seq):
    torch.manual_seed(seq)
    q, k, v = (torch.randn(1, heads, seq, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    exact = attn.attention(q.float(), k.float(), v.float())
    got = attn.sdpa_attention(q, k, v)
    own = attn.attention(q, k, v)  # PyTorch math in bf16 in/out (fp32 inside): bf16's own error
    assert torch.isfinite(got).all()
    within_twice_pytorch(got, exact, own)


def test_sdpa_runs_cudnn_first_on_hopper_also_compiled():
    """cvfast's SDPA preference on compute capability 9.x: the cuDNN kernel runs, eager and under
    torch.compile (the preference traced into the graph), within the 2x rule."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the cuDNN preference applies to Hopper (compute capability 9.x) only")
    torch.manual_seed(4001)
    q, k, v = (torch.randn(1, 30, 4001, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    exact, own = attn.attention(q.float(), k.float(), v.float()), attn.attention(q, k, v)
    compiled = torch.compile(attn.sdpa_attention, fullgraph=True)
    for fn in (attn.sdpa_attention, compiled):
        fn(q, k, v)  # the compiled one compiles here, outside the profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            got = fn(q, k, v)
            torch.cuda.synchronize()
        ops_run = {event.key for event in prof.key_averages()}
        assert "aten::_scaled_dot_product_cudnn_attention" in ops_run, sorted(ops_run)[:20]
        check(got, exact, own)


def _installed_attention(backend: str) -> ops.Impl:
    """The `attention` Impl of an optional package, or a skip naming why it cannot run here (the
    package is not installed, or this GPU is older than it needs)."""
    impl = next(i for i in ops.alternatives("attention") if i.backend == backend)
    reasons = impl.device_reasons(torch.device("cuda"))
    if reasons:
        pytest.skip("; ".join(reasons))
    return impl


def _attention_at_5b_size():
    """q, k, v at 5B size (48 heads of 64, 17,776 tokens) in bf16, the fp32 result and PyTorch's in bf16."""
    torch.manual_seed(48)
    q, k, v = (torch.randn(1, 48, 17_776, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return (q, k, v), attn.attention(q.float(), k.float(), v.float()), attn.attention(q, k, v)


@pytest.mark.parametrize("backend", ["flash_attn", "flash_attn_4"])
def test_optional_flash_attention_at_5b_size(backend):
    impl = _installed_attention(backend)
    qkv, exact, own = _attention_at_5b_size()
    check(impl.fn(*qkv), exact, own)


def test_sageattention_within_its_int8_error_at_5b_size():
    """SageAttention rounds q and k to int8 per block (scale absmax / 127). With unit-normal inputs a
    block's absmax is about 3.8 (8,192 samples), a step of 0.030, a rounding error of 0.030 / sqrt(12)
    = 0.0087 RMS per element; a score q.k / sqrt(d) (unit RMS) then errs by sqrt(2) x 0.0087 = 0.0123
    RMS, which the output inherits as its relative error (o = sum p_j v_j, each p_j off by that
    fraction, independently); the fp16 rounding of P and V adds 2^-11. Bound: twice that, 0.025."""
    impl = _installed_attention("sageattention")
    qkv, exact, _ = _attention_at_5b_size()
    got = impl.fn(*qkv)
    assert torch.isfinite(got).all() and rel_l2(got, exact) < 0.025


def test_offload_model_keeps_only_the_vae_on_the_gpu_while_decoding():
    pipe = cvfast.load("tiny", offload="model")
    seen = {}
    real_decode = pipe.vae.decode

    def spy(z, **kw):
        seen.update(pipe.placement())
        return real_decode(z, **kw)

    pipe.vae.decode = spy
    result = pipe.generate("a cat", num_inference_steps=2, seed=0, progress=False)
    assert seen["vae"].startswith("cuda") and seen["transformer"] == "cpu" and seen["text_encoder"] == "cpu"
    assert {"text_encoding", "denoising", "decoding"} <= set(result.peak_memory_gib)
    resident = cvfast.load("tiny").generate("a cat", num_inference_steps=2, seed=0, progress=False)
    # The text encoder and transformer weights are not on the GPU during the decode.
    assert result.peak_memory_gib["decoding"] < resident.peak_memory_gib["decoding"]


# -- Triton kernels at CogVideoX sizes (bf16), with the checks of tests/test_triton.py ---------------

def _triton():
    require("triton")


def _joint_attention_at_5b_size(heads: int, head_dim: int, rope: bool):
    """(qkv, the op's other args, the fp32 result, PyTorch's own bf16 result) at 49x480x720."""
    torch.manual_seed(heads)
    n_text, seq = 226, 17_776  # 49 frames at 480x720: 13 x 30 x 45 video tokens
    qkv = torch.randn(1, seq, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16)
    norm = [torch.randn(head_dim, device="cuda", dtype=torch.bfloat16) * 0.2 + (1 if i % 2 == 0 else 0)
            for i in range(4)]
    angles = torch.randn(seq - n_text, head_dim // 2, device="cuda")
    cos, sin = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)) if rope else (None, None)
    args = (heads, *norm, 1e-6, cos, sin, n_text)
    exact = attn.joint_attention(qkv.float(), heads, *[n.float() for n in norm], 1e-6, cos, sin, n_text)
    return qkv, args, exact, attn.joint_attention(qkv, *args, attend=naive_attention)


@pytest.mark.parametrize("heads,head_dim,rope", [(48, 64, True), (30, 64, False), (24, 128, True)])
def test_triton_joint_attention_at_5b_size(heads, head_dim, rope):
    _triton()
    qkv, args, exact, own = _joint_attention_at_5b_size(heads, head_dim, rope)
    check(attn.joint_attention_op(qkv, *args), exact, own)


@pytest.mark.parametrize("heads,head_dim", [(48, 64), (24, 128)])
def test_triton_joint_attention_through_tma_at_5b_size(heads, head_dim):
    """The tensor-descriptor variant the benchmarks measure (`triton-tma`), on the Hopper TMA path."""
    _triton()
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs compute capability 9.0 (Hopper)")
    qkv, (heads, qw, qb, kw, kb, eps, cos, sin, n_text), exact, own = _joint_attention_at_5b_size(heads, head_dim, True)
    got = kernels.attention.joint_attention_tma(qkv, heads, (qw, qb, kw, kb, eps), (cos, sin), n_text)
    check(got, exact, own)


@pytest.mark.parametrize("dim", [1920, 3072])
def test_triton_norm_rows_at_5b_size(dim):
    _triton()
    torch.manual_seed(dim)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    h, y = torch.randn(2, 17_776, dim, **bf16), torch.randn(2, 17_776, dim, **bf16)
    w, b = torch.randn(dim, **bf16), torch.randn(dim, **bf16)
    gate, shift, scale = (torch.randn(2, 2, dim, **bf16) * 0.5 for _ in range(3))
    args = (h, y, gate, w, b, shift, scale, 226, 1e-5)
    exact = adaln.gated_residual_modulate(*fp32(*args))
    check(adaln.triton_gated_residual_modulate(*args), exact, adaln.gated_residual_modulate(*args))


def test_triton_backend_generates_like_the_reference_in_bf16():
    _triton()
    kw = dict(num_inference_steps=4, seed=0, progress=False, output_type="pt")
    exact = cvfast.load("tiny", device="cpu").generate("a red boat", **kw).frames
    lowp = {b: cvfast.load("tiny", dtype=torch.bfloat16, backend=b).generate("a red boat", **kw).frames
            for b in ("reference", "triton")}
    assert torch.isfinite(lowp["triton"]).all()
    assert rel_l2(lowp["triton"], exact) <= 2 * rel_l2(lowp["reference"], exact) + 1e-3
# -- CUDA-graph sampler (cvfast/sampler/graph.py) ------------------------------------------------
# A shape's first generate() runs eagerly, the second captures its step (the first step is the
# warm-up) and replays the rest, the third replays every step: each must equal the eager run bit for
# bit, since a replay runs the same kernels on the same buffers.

def graphed_calls(pipe, **kw):
    """Three calls with cuda_graph=True and the eager one; all with the same seed."""
    kw = {"num_inference_steps": 4, "seed": 0, "progress": False, "output_type": "latent", **kw}
    eager = pipe.generate("a red boat", cuda_graph=False, **kw).frames
    return eager, [pipe.generate("a red boat", cuda_graph=True, **kw).frames for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager_bit_for_bit(dtype):
    pipe = cvfast.load("tiny", device="cuda", dtype=dtype)
    eager, graphed = graphed_calls(pipe)
    assert torch.isfinite(eager).all()
    for got in graphed:
        assert torch.equal(got, eager)
    (entry,) = pipe.graphs.entries.values()
    assert set(entry.graphs) == {"step"} and entry.uses == 3


def test_graph_replay_equals_eager_with_dpm_and_dynamic_cfg():
    from tests.fixtures import tiny_folder
    require("diffusers")
    pipe = cvfast.load(tiny_folder("5b", "dpm"), device="cuda", dtype=torch.bfloat16)
    eager, graphed = graphed_calls(pipe, use_dynamic_cfg=True, num_frames=17, height=48, width=80)
    for got in graphed:
        assert torch.equal(got, eager)


def test_second_shape_is_captured_separately():
    pipe = cvfast.load("tiny", device="cuda", cuda_graph=True)
    small, large = {"num_frames": 9, "height": 64, "width": 96}, {"num_frames": 17, "height": 96, "width": 128}
    eager_small, graphed_small = graphed_calls(pipe, **small)
    eager_large, graphed_large = graphed_calls(pipe, **large)
    assert len(pipe.graphs.entries) == 2 and all(set(e.graphs) == {"step"} for e in pipe.graphs.entries.values())
    assert pipe.graphs.held_bytes() > 0
    # Both graphs share the device's pool; replaying one must not disturb the other.
    again_small = pipe.generate("a red boat", num_inference_steps=4, seed=0, progress=False, output_type="latent",
                                **small).frames
    assert all(torch.equal(g, eager_small) for g in graphed_small + [again_small])
    assert all(torch.equal(g, eager_large) for g in graphed_large)


@pytest.mark.parametrize("cache,parts", [("teacache", {"compute", "reuse"}),
                                         ("fbcache:0.3", {"first-block", "compute", "reuse"})])
def test_cached_step_variants_replayed_from_graphs_equal_eager(cache, parts):
    """Each step-cache variant is captured on its own; the replays equal the eager cached run bit for
    bit, with the same steps computed (FirstBlockCache reads its decision between two graphs)."""
    pipe = cvfast.load("tiny", device="cuda", dtype=torch.float32)
    kw = dict(num_inference_steps=10, seed=0, progress=False, output_type="latent", cache=cache)
    eager = pipe.generate("a red boat", cuda_graph=False, **kw)
    assert eager.cache["skipped_steps"]
    for _ in range(3):
        got = pipe.generate("a red boat", cuda_graph=True, **kw)
        assert torch.equal(got.frames, eager.frames) and got.cache == eager.cache
    (entry,) = pipe.graphs.entries.values()
    assert set(entry.graphs) == parts


# -- TensorRT engines (need the tensorrt package as well) -----------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensorrt_engine_generates_like_the_reference(tmp_path, dtype):
    pytest.importorskip("tensorrt", reason="the tensorrt package is not installed")
    from cvfast.export import build_engines
    from tests.fixtures import tiny_folder
    folder = tiny_folder("5b")
    kw = dict(num_frames=9, height=64, width=96, num_inference_steps=4, seed=0, progress=False, output_type="pt",
              max_sequence_length=16)
    exact = cvfast.load(folder, device="cpu").generate("a red boat", **kw).frames
    [plan] = build_engines(cvfast.load(folder, device="cpu"), tmp_path, [(9, 64, 96)], dtype=dtype, text_len=16)
    got = cvfast.load(folder, backend="tensorrt", engine=plan).generate("a red boat", **kw).frames
    lowp = cvfast.load(folder, dtype=dtype, backend="reference").generate("a red boat", **kw).frames
    assert torch.isfinite(got).all()
    # fp32: TensorRT may run fp32 matmuls in TF32, hence the absolute allowance.
    assert rel_l2(got, exact) <= 2 * rel_l2(lowp, exact) + (1e-3 if dtype == torch.float32 else 1e-2)


# The fused VAE norm (native CUDA kernel and Triton) at CogVideoX decoder sizes: 512/256/128 channels,
# 32 groups, 60x90 .. 480x720, frame chunks of 2-8, contiguous and channels_last_3d, bf16, with and
# without the spatial modulation. FlashAttention's rule against the fp32 reference.
VAE_NORM_SIZES = [(1, 512, 2, 60, 90), (1, 256, 4, 240, 360), (1, 128, 8, 480, 720)]


def _group_norm_backend(name):
    if name == "triton":
        _triton()
        return gn.triton_group_norm
    if not gn.NATIVE_CUDA:
        if shutil.which("nvcc"):
            pytest.fail("nvcc is installed but cvfast._C was built without its CUDA kernels (see build/native/build.log)")
        pytest.skip("cvfast._C was built without CUDA (no nvcc)")
    return gn.native_group_norm


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("shape", VAE_NORM_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("spatial", [True, False], ids=["spatial_silu", "silu"])
def test_vae_norm_at_decoder_sizes(backend, shape, channels_last, spatial):
    group_norm = _group_norm_backend(backend)
    gen = torch.Generator(device="cuda").manual_seed(shape[1])
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    rand = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    x = (rand(*shape) * 2 + rand(1, shape[1], 1, 1, 1)).to(torch.bfloat16).contiguous(memory_format=fmt)
    w, b = (rand(shape[1]) * 0.5 + 1).bfloat16(), (rand(shape[1]) * 0.2).bfloat16()
    scale = shift = None
    if spatial:
        scale = (rand(*shape) * 0.5 + 1).bfloat16().contiguous(memory_format=fmt)
        shift = (rand(*shape) * 0.3).bfloat16().contiguous(memory_format=fmt)
    exact = gn.group_norm(*fp32(x, w, b), 32, 1e-6, *fp32(scale, shift), silu=True)
    own = gn.group_norm(x, w, b, 32, 1e-6, scale, shift, silu=True)
    check(group_norm(x, w, b, 32, 1e-6, scale, shift, True), exact, own)


# The Triton causal conv at CogVideoX decoder sizes in bf16: conv_in (16 -> 512 at the 60x90 latent),
# resnet convs at 512/256/128 channels (60x90 .. 480x720, chunks of 2-8 frames), conv_out (128 -> 3);
# channels-last (how the fast VAE path runs it) and contiguous; with a cache, the fused residual.
CONV_SIZES = [(16, 512, 2, 60, 90), (512, 512, 2, 60, 90), (256, 256, 4, 240, 360), (128, 128, 8, 480, 720),
              (128, 3, 8, 480, 720)]


@pytest.mark.parametrize("c_in,c_out,frames,height,width", CONV_SIZES, ids=lambda s: str(s))
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_triton_causal_conv3d_at_decoder_sizes(c_in, c_out, frames, height, width, channels_last):
    _triton()
    gen = torch.Generator(device="cuda").manual_seed(c_in + c_out)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    rand = lambda *s: torch.randn(*s, device="cuda", generator=gen).bfloat16()  # noqa: E731
    x = rand(1, c_in, frames, height, width).contiguous(memory_format=fmt)
    past = rand(1, c_in, 2, height, width).contiguous(memory_format=fmt)
    weight, bias = (rand(c_out, c_in, 3, 3, 3).float() / (27 * c_in) ** 0.5).bfloat16(), rand(c_out)
    residual = rand(1, c_out, frames, height, width).contiguous(memory_format=fmt)
    for args in ((x, weight, bias, past, residual), (x, weight, bias, None, None)):
        exact, own = conv.causal_conv3d(*fp32(*args)), conv.causal_conv3d(*args)
        got = conv.triton_causal_conv3d(*args)
        assert got.is_contiguous(memory_format=fmt)
        check(got, exact, own)
        del exact, own, got


def test_fast_vae_decode_with_tiling_and_frame_batches():
    """fp32: the tiny model's VAE decode through the Triton kernels equals the reference decode, with
    spatial tiling (a latent 1.5 tiles wide) and several frame chunks (5 latent frames)."""
    from cvfast.models.vae_tiling import Tiling
    videos = {}
    for backend in ("reference", "triton"):
        pipe = cvfast.load("tiny", device="cuda", dtype=torch.float32, backend=backend)
        tiling = Tiling.for_vae(pipe.vae.config)
        grid = tiling.grid(pipe.vae.config.spatial_factor, decode=True)
        z = torch.randn(1, 4, 5, grid.tile[0] * 3 // 2, grid.tile[1] * 3 // 2,
                        generator=torch.Generator().manual_seed(0)).cuda()
        videos[backend] = pipe.vae.decode(z, tiling=tiling)
    assert pipe.backends()["causal_conv3d"] == "triton"
    assert rel_l2(videos["triton"], videos["reference"]) < 1e-4


# The fused spatial norm at decoder sizes (bf16): 512 channels at the 60x90 latent size, 256 at
# 240x360 (8 frames from 2 latent frames), 128 at 480x720 (9 frames from 3: the lone first frame).
SPATIAL_NORM_SIZES = [((1, 512, 2, 60, 90), 2), ((1, 256, 8, 240, 360), 2), ((1, 128, 9, 480, 720), 3)]


@pytest.mark.parametrize("shape,latent_frames", SPATIAL_NORM_SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_triton_spatial_norm_at_decoder_sizes(shape, latent_frames, channels_last):
    _triton()
    gen = torch.Generator(device="cuda").manual_seed(shape[1])
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    rand = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    c = shape[1]
    f = (rand(*shape) * 2 + rand(1, c, 1, 1, 1)).bfloat16().contiguous(memory_format=fmt)
    z = rand(1, 16, latent_frames, 60, 90).bfloat16().contiguous(memory_format=fmt)
    params = [rand(c) * 0.5 + 1, rand(c) * 0.2, rand(c, 16, 1, 1, 1) * 0.3, rand(c) + 1, rand(c, 16, 1, 1, 1) * 0.3,
              rand(c) * 0.3]
    args = (f, z, *params[:2], 32, 1e-6, *params[2:], True)
    args = tuple(a.bfloat16() if isinstance(a, torch.Tensor) else a for a in args)
    exact, own = spatial_norm.spatial_norm(*fp32(*args)), spatial_norm.spatial_norm(*args)
    got = spatial_norm.triton_spatial_norm(*args)
    assert got.is_contiguous(memory_format=fmt)
    check(got, exact, own)


# -- 8-bit precision (cvfast/ops/quantized.py): the fast backends against their CPU-tested emulations --

def _fp8_device():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 (Ada, Hopper)")


def test_scaled_mm_linear_matches_the_fp8_emulation():
    """Same quantization; the tensor cores sum the e4m3 products in another order and round the output
    to bf16 once: within bf16's rounding (2^-8 relative) of the emulation's bf16 output."""
    _fp8_device()
    from cvfast.ops import quantized
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 301, 3072, device="cuda", generator=gen).bfloat16()
    w8, scale = quantized.quantize_rows(torch.randn(1536, 3072, device="cuda", generator=gen) * 0.02)
    bias = torch.randn(1536, device="cuda", generator=gen).bfloat16()
    got = quantized.scaled_mm_linear(x, w8, scale, bias)
    assert rel_l2(got, quantized.fp8_linear(x, w8, scale, bias)) < 2 ** -8


def test_triton_8bit_attention_matches_its_emulation_at_cogvideox_size():
    """Same scales and int8 products; the kernel's exp2 (ex2.approx, relative error within 2^-22 by
    the PTX manual) and the emulation's (exp2f, 2 ulp) differ by delta <= 2^-21, which flips P's e4m3
    rounding for a fraction <= 2 * delta / 2^-4 = 32 delta of its entries (e4m3's relative spacing is
    2^-4..2^-3), each flip moving its entry by <= 2^-3 of itself. With random V those errors add in
    quadrature: rel L2 <= sqrt(32 delta) * 2^-3 = 2^-11. (Under the interpreter both use numpy's exp2:
    test_quantized holds them within 1e-5. H200, 2026-11-27: 9.3e-5 here.)"""
    _fp8_device()
    _triton()
    from cvfast.ops import quantized
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 48, 2027, 64, device="cuda", generator=gen) for _ in range(3))
    k = k + 10 * torch.randn(1, 48, 1, 64, device="cuda", generator=gen).sign()
    got = quantized.triton_quantized_attention(q, k, v)
    assert rel_l2(got, quantized.quantized_attention(q, k, v)) < 2 ** -11


def test_fp8_pipeline_on_cuda_passes_the_gate():
    _fp8_device()
    from cvfast.pipeline.accuracy import compare
    fp8 = cvfast.load("tiny", device="cuda", precision="fp8")
    report = compare(cvfast.load("tiny", device="cuda"), fp8, "a red boat", num_inference_steps=4)
    assert report["passed"], report
    assert fp8.backends()["fp8_linear"] == "scaled-mm"


def test_sequential_offload_holds_one_block_of_weights_on_the_gpu():
    """offload="sequential": while a transformer block runs, it is the only block on the GPU, and the
    video equals the resident pipeline's."""
    pipe = cvfast.load("tiny", offload="sequential")
    on_gpu = []

    def count(module, args):  # a pre-hook registered after the offload's: the block has arrived
        on_gpu.append(sum(next(b.parameters()).is_cuda for b in pipe.transformer.blocks))
    for block in pipe.transformer.blocks:
        block.register_forward_pre_hook(count)
    kw = dict(num_inference_steps=2, seed=0, progress=False, output_type="latent")
    frames = pipe.generate("a cat", **kw).frames
    assert on_gpu and set(on_gpu) == {1}
    assert all(not next(b.parameters()).is_cuda for b in pipe.transformer.blocks)  # all back home
    assert torch.equal(frames, cvfast.load("tiny").generate("a cat", **kw).frames)


def test_compiled_blocks_replayed_from_cuda_graphs_equal_eager():
    """compile=True composes with cuda_graph=True: the capture follows the compiling eager warm-up,
    and replays of the compiled step give the eager compiled run's latents bit for bit; fp32 against
    the uncompiled pipeline within 1e-5 (Inductor's fused arithmetic)."""
    kw = dict(num_inference_steps=4, seed=0, progress=False, output_type="latent")
    eager = cvfast.load("tiny", dtype=torch.float32).generate("a red boat", cuda_graph=False, **kw).frames
    pipe = cvfast.load("tiny", dtype=torch.float32, compile=True)
    compiled = pipe.generate("a red boat", cuda_graph=False, **kw).frames
    replays = [pipe.generate("a red boat", cuda_graph=True, **kw).frames for _ in range(3)]
    assert rel_l2(compiled, eager) < 1e-5
    assert all(torch.equal(r, compiled) for r in replays)
