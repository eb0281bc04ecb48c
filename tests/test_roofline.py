"""The roofline suite against hand-computed FLOPs and bytes (no compute runs: meta tensors).

Conventions checked here: `forward_tflop` and `bytes_per_forward_*` are one forward at batch 1; the
per-op rows and `step_tflop` are one sampler step, i.e. the forward at batch 2 with CFG.
"""
import dataclasses

import pytest

from benchmarks.suite_roofline import Trace, load_devices, roofline
from cvfast.models.config import PRESETS

TEXT = 226


def hand_forward_flop(layers: int, dim: int, seq: int) -> int:
    """Per layer: linear 24*S*D^2 (qkv 6, out 2, MLP 16) + attention 4*S^2*D (QK^T and PV, 2 each)."""
    return layers * (24 * seq * dim ** 2 + 4 * seq ** 2 * dim)


def by_case(rows):
    return {r.case: r for r in rows}


@pytest.fixture(scope="module")
def five_b():
    return roofline("5b", 49, 480, 720)  # cfg=True, 50 steps, h100-sxm


@pytest.fixture(scope="module")
def two_b():
    return roofline("2b", 49, 480, 720)


def test_5b_forward_flop_matches_hand_count(five_b):
    rows, summary = five_b
    seq = 13 * 30 * 45 + TEXT
    assert summary["joint_seq"] == seq == 17_776
    hand = hand_forward_flop(42, 3072, seq)
    assert hand / 1e12 == pytest.approx(332.2, abs=0.05)
    # A little above the hand count: text/patch embedding, modulation and output projections.
    assert hand / 1e12 <= summary["forward_tflop"] <= 1.01 * hand / 1e12
    assert summary["step_tflop"] == pytest.approx(2 * summary["forward_tflop"], rel=1e-12)
    # Attention at the step batch (2 with CFG): QK^T plus PV, exactly.
    assert by_case(rows)["joint_attention"].extra["flop"] == 2 * 42 * 4 * seq ** 2 * 3072


def test_2b_forward_flop_matches_hand_count(two_b):
    rows, summary = two_b
    seq = 17_776
    hand = hand_forward_flop(30, 1920, seq)
    assert hand / 1e12 == pytest.approx(120.0, abs=0.05)
    assert hand / 1e12 <= summary["forward_tflop"] <= 1.01 * hand / 1e12
    assert by_case(rows)["joint_attention"].extra["flop"] == 2 * 30 * 4 * seq ** 2 * 1920
    # 2B has sincos positions: its attention reads no rope tables (q, k, v, o and the QK norms only).
    assert by_case(rows)["joint_attention"].extra["bytes_fused"] == 30 * (4 * 2 * 30 * seq * 64 * 2 + 4 * 64 * 2)


def test_h100_floor_is_compute_bound_at_5b_size(five_b):
    _, summary = five_b
    compute_only = 50 * 2 * summary["forward_tflop"] * 1e12 / 790e12
    assert compute_only <= summary["floor_s_50_steps"] <= 1.3 * compute_only
    assert summary["device"] == "NVIDIA H100 SXM"
    assert summary["floor_s_50_steps"] == pytest.approx(50 * summary["floor_s_per_step"])


def test_h200_same_flops_faster_memory(five_b):
    _, h100 = five_b
    _, h200 = roofline("5b", 49, 480, 720, device_key="h200")
    assert h200["step_tflop"] == h100["step_tflop"]
    assert h200["floor_s_50_steps"] < h100["floor_s_50_steps"]


def test_fused_bytes_and_attention_traffic(five_b):
    rows, summary = five_b
    assert summary["bytes_per_forward_fused"] < summary["bytes_per_forward_reference"]
    for r in rows:
        assert r.extra["bytes_fused"] <= r.extra["bytes_reference"], r.case
    attn = by_case(rows)["joint_attention"].extra
    batch, heads, seq, head_dim, bf16 = 2, 48, 17_776, 64, 2
    qkv_and_out = 4 * batch * heads * seq * head_dim * bf16
    qk_norms, rope_tables = 4 * head_dim * bf16, 2 * (seq - TEXT) * head_dim * 4  # fp32 cos, sin
    assert attn["bytes_fused"] == 42 * (qkv_and_out + qk_norms + rope_tables)
    assert attn["bytes_reference"] > 100 * attn["bytes_fused"]  # fp32 score blocks
    assert attn["count"] == 42


def test_rows_sum_to_the_step(five_b, two_b):
    for rows, summary in (five_b, two_b):
        assert sum(r.extra["flop"] for r in rows) / 1e12 == pytest.approx(summary["step_tflop"], rel=1e-12)
        assert sum(r.extra["bytes_fused"] for r in rows) == summary["bytes_per_step_fused"]
        assert sum(r.extra["bytes_reference"] for r in rows) == summary["bytes_per_step_reference"]
        assert sum(r.median_ms for r in rows) / 1e3 == pytest.approx(summary["floor_s_per_step"], rel=1e-9)
        for r in rows:
            assert r.suite == "roofline" and r.backend == "floor" and r.tflops is None
            assert r.median_ms >= max(r.extra["compute_ms"], r.extra["memory_fused_ms"]) * (1 - 1e-9)


def test_tiny_and_no_cfg():
    rows, summary = roofline("tiny", 9, 64, 96, steps=4, cfg=False)
    assert rows and all(r.median_ms > 0 for r in rows)
    assert summary["step_batch"] == 1 and summary["step_tflop"] == summary["forward_tflop"] > 0
    assert summary["floor_s_4_steps"] == pytest.approx(4 * summary["floor_s_per_step"])
    assert summary["floor_s_50_steps"] == pytest.approx(50 * summary["floor_s_per_step"])
    assert {"joint_attention", "modulate", "gated_residual_modulate", "layer_norm", "gelu_mlp", "linear"} <= set(by_case(rows))


def test_temporal_patching_pads_latent_frames():
    _, summary = roofline("1.5-5b", 9, 64, 96)  # 3 latent frames, padded to 4, patched in pairs
    assert summary["latent_shape"] == [4, 8, 12]
    assert summary["video_tokens"] == 2 * 4 * 6 and summary["joint_seq"] == TEXT + 48


@pytest.mark.parametrize("preset", ["2b", "5b"])
def test_repeating_a_traced_block_equals_tracing_every_block(preset):
    cfg = dataclasses.replace(PRESETS[preset], num_layers=3)
    trace = Trace(cfg, (3, 8, 12), TEXT)
    repeated = trace.run(2)
    full = trace.run(2, repeat_blocks=False)
    key = lambda u: (u.label, u.flop, u.bytes_reference, u.fused, u.part)  # noqa: E731
    assert [key(u) for u in repeated] == [key(u) for u in full]


def test_devices_file_has_sources():
    devices = load_devices()
    assert {"h100-sxm", "h200"} <= set(devices)
    for entry in devices.values():
        assert entry["sources"] and entry["bf16_tflops_measured"] <= entry["bf16_tflops_peak"]


@pytest.mark.parametrize("args", [("5b", 48, 480, 720), ("5b", 49, 480, 712), ("nope", 49, 480, 720),
                                  ("5b-i2v", 49, 768, 1360)])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        roofline(*args)


def test_unknown_device():
    with pytest.raises(ValueError):
        roofline("tiny", 9, 64, 96, device_key="tpu")
