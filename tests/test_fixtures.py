"""Sanity checks for the tiny random CogVideoX folders (tests/fixtures.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.extras import require
from tests.fixtures import (
    MAX_TEXT_SEQ_LEN,
    SPM_VOCAB_SIZE,
    TINY_FRAMES,
    TINY_HEIGHT,
    TINY_WIDTH,
    TOKENIZER_LEN,
    make_tiny_folder,
    pipeline_class,
    tiny_folder,
)

LONG_PROMPT = (
    "a panda plays guitar in a bamboo forest while the sun sets over the ocean "
    "and a red car drives along a mountain road under the stars"
)


def _load_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def tiny_frames(pipe, **kwargs):
    """diffusers' pipeline at the tiny size: 2 steps with CFG, seed 0, frames as numpy."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_frames=TINY_FRAMES, height=TINY_HEIGHT, width=TINY_WIDTH, num_inference_steps=2,
                guidance_scale=6.0, max_sequence_length=MAX_TEXT_SEQ_LEN, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0), **kwargs).frames


@pytest.mark.parametrize("variant", ["2b", "5b", "1.5"])
def test_pipeline_runs(variant):
    import diffusers

    folder = tiny_folder(variant, "ddim")
    frames = tiny_frames(diffusers.CogVideoXPipeline.from_pretrained(str(folder)), prompt=LONG_PROMPT,
                         negative_prompt="")
    assert frames.shape == (1, TINY_FRAMES, TINY_HEIGHT, TINY_WIDTH, 3)
    assert np.isfinite(frames).all()
    assert frames.std() > 0.05  # not a constant image


@pytest.mark.parametrize("variant", ["5b-i2v", "1.5-i2v"])
def test_i2v_pipeline_runs(variant):
    from PIL import Image

    folder = tiny_folder(variant, "ddim")
    pipe = pipeline_class(variant).from_pretrained(str(folder))
    assert type(pipe).__name__ == "CogVideoXImageToVideoPipeline"
    image = Image.fromarray((np.random.RandomState(0).rand(TINY_HEIGHT, TINY_WIDTH, 3) * 255).astype(np.uint8))
    frames = tiny_frames(pipe, image=image, prompt="a cat")
    assert frames.shape == (1, TINY_FRAMES, TINY_HEIGHT, TINY_WIDTH, 3)
    assert np.isfinite(frames).all()


def test_tokenizer_loads_and_truncates():
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = tiny_folder("2b", "ddim")
    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    assert type(tok).__name__ == "T5Tokenizer"
    assert len(tok) == TOKENIZER_LEN
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == TOKENIZER_LEN - 1
    assert tok.convert_tokens_to_ids("<extra_id_99>") == SPM_VOCAB_SIZE

    ids = tok(
        [LONG_PROMPT], padding="max_length", max_length=MAX_TEXT_SEQ_LEN, truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.shape == (1, MAX_TEXT_SEQ_LEN)
    assert ids[0, -1].item() == tok.eos_token_id

    # short prompt: padded with <pad>=0 after </s>
    short = tok(["a cat"], padding="max_length", max_length=MAX_TEXT_SEQ_LEN, truncation=True).input_ids[0]
    assert short[-1] == 0 and 1 in short

    # tokenizers-backed encoding == the sentencepiece model shipped next to it
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer" / "spiece.model"))
    assert sp.get_piece_size() == SPM_VOCAB_SIZE
    for text in [LONG_PROMPT, "A  Panda,   dancing in the RAIN!! 123 xyz", "ＡＢＣ ｄｏｇ"]:
        assert tok(text).input_ids == sp.encode(text) + [1]


def test_spiece_only_tokenizer_layout(tmp_path):
    """tokenizer_json=False = the real CogVideoX layout; transformers 5 needs protobuf to convert it."""
    require("google.protobuf")
    from transformers import AutoTokenizer

    from tests.fixtures import write_tokenizer

    a = AutoTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "spm_only", tokenizer_json=False)))
    b = AutoTokenizer.from_pretrained(str(tiny_folder("2b", "ddim") / "tokenizer"))
    assert not (tmp_path / "spm_only" / "tokenizer.json").exists()
    assert len(a) == len(b) == TOKENIZER_LEN
    for text in [LONG_PROMPT, "A  Panda,   dancing in the RAIN!! 123 xyz <extra_id_3>"]:
        assert a(text).input_ids == b(text).input_ids


def test_sharded_transformer_matches_unsharded(tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    a = make_tiny_folder(tmp_path, "5b", shard=True, name="sharded")
    b = make_tiny_folder(tmp_path, "5b", name="single")
    tdir = a / "transformer"
    shards = sorted(p.name for p in tdir.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert all(re.fullmatch(rf"diffusion_pytorch_model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert not (tdir / "diffusion_pytorch_model.safetensors").exists()
    index = json.loads((tdir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)

    sharded, single = _load_tensors(tdir), _load_tensors(b / "transformer")
    assert set(index["weight_map"]) == set(sharded) == set(single)
    for k in single:
        assert torch.equal(sharded[k], single[k]), k

    m = CogVideoXTransformer3DModel.from_pretrained(str(tdir))
    sd = m.state_dict()
    for k in single:
        assert torch.equal(sd[k], single[k]), k


@pytest.mark.parametrize("variant", ["2b", "5b-i2v", "1.5"])
def test_every_tensor_is_random(variant):
    folder = tiny_folder(variant, "ddim")
    for comp in ("transformer", "vae", "text_encoder"):
        tensors = _load_tensors(folder / comp)
        assert tensors, comp
        for k, t in tensors.items():
            t = t.float()
            assert t.std() > 1e-3, f"{comp}/{k} is constant"
            assert not torch.all(t == 1) and not torch.all(t == 0), f"{comp}/{k} is trivial"
    if variant == "5b-i2v":
        assert "patch_embed.pos_embedding" in _load_tensors(folder / "transformer")


def test_dtypes_schedulers_and_determinism(tmp_path):
    from diffusers import CogVideoXDPMScheduler

    a = make_tiny_folder(tmp_path, "5b", "dpm", vae_dtype=torch.bfloat16, transformer_dtype=torch.bfloat16, name="a")
    assert {t.dtype for t in _load_tensors(a / "vae").values()} == {torch.bfloat16}
    assert {t.dtype for t in _load_tensors(a / "transformer").values()} == {torch.bfloat16}
    assert {t.dtype for t in _load_tensors(a / "text_encoder").values()} == {torch.float32}

    index = json.loads((a / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "CogVideoXDPMScheduler"]
    sched = CogVideoXDPMScheduler.from_pretrained(str(a / "scheduler"))
    assert sched.config.snr_shift_scale == 1.0 and sched.config.prediction_type == "v_prediction"

    # same seed -> identical weights; different seed -> different weights
    b = make_tiny_folder(tmp_path, "5b", "dpm", vae_dtype=torch.bfloat16, transformer_dtype=torch.bfloat16, name="b")
    c = make_tiny_folder(tmp_path, "5b", "dpm", seed=1, name="c")
    ta, tb, tc = (_load_tensors(x / "transformer") for x in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["proj_out.weight"].float(), tc["proj_out.weight"])
    assert (a / "tokenizer" / "spiece.model").read_bytes() == (c / "tokenizer" / "spiece.model").read_bytes()
