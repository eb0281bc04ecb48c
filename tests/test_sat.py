"""SAT checkpoints (load, convert-sat), safe pickle loading and SAT LoRA.

Each tiny diffusers fixture is written back in SAT's layout by the inverse mapping below, which is
built from SAT's module tree (dit_video_concat.py: `transformer.layers.<i>` with a fused
`query_key_value`, the AdaLN mixin's 12-chunk `adaLN_modulations` in the order of its forward, per-layer
QK-norm lists; the VAE's `down`/`up`/`mid.block_<n>` with up blocks counted from the other end), not
from cvfast's forward mapping. Loading that SAT directory must give back the original model exactly.
"""
import argparse
import fractions
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import cvfast
from cvfast.cli import main as cli_main
from cvfast import LoRAError, UnsafePickleError, WeightError, convert_sat
from tests.fixtures import scheduler_config, tiny_folder, transformer_config, vae_config
from tests.test_pipeline import PROMPT, SIZE, diffusers_frames
from tests.numerics import rel_l2
from tests.extras import require

diffusers = require("diffusers")

P = "model.diffusion_model."
RANK = 3
GEN = dict(num_inference_steps=2, guidance_scale=6.0, seed=11, progress=False, **SIZE)


def read(folder, component):
    with safe_open(str(folder / component / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def sat_transformer(d, num_layers, lora_wrapped=False):
    """diffusers transformer tensors -> SAT engine state dict. lora_wrapped: the attention layers
    are LoraLinear modules, whose base weights are `<layer>.original.<weight|bias>`."""
    wrap = ".original" if lora_wrapped else ""
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "ofs_embedding.linear_1": "ofs_embed.0", "ofs_embedding.linear_2": "ofs_embed.2",
           "patch_embed.proj": "mixins.patch_embed.proj", "patch_embed.text_proj": "mixins.patch_embed.text_proj",
           "norm_final": "transformer.final_layernorm", "norm_out.norm": "mixins.final_layer.norm_final",
           "norm_out.linear": "mixins.final_layer.adaLN_modulation.1", "proj_out": "mixins.final_layer.linear"}
    sd = {P + f"{sat}.{wb}": d[f"{ours}.{wb}"] for ours, sat in top.items() for wb in ("weight", "bias")
          if f"{ours}.{wb}" in d}
    if "patch_embed.pos_embedding" in d:
        sd[P + "mixins.pos_embed.pos_embedding"] = d["patch_embed.pos_embedding"]
    for i in range(num_layers):
        b, layer, adaln = f"transformer_blocks.{i}.", f"{P}transformer.layers.{i}.", f"{P}mixins.adaln_layer."
        for wb in ("weight", "bias"):
            sd[f"{layer}input_layernorm.{wb}"] = d[f"{b}norm1.norm.{wb}"]
            sd[f"{layer}post_attention_layernorm.{wb}"] = d[f"{b}norm2.norm.{wb}"]
            sd[f"{layer}attention.query_key_value{wrap}.{wb}"] = torch.cat([d[f"{b}attn1.to_{p}.{wb}"] for p in "qkv"])
            sd[f"{layer}attention.dense{wrap}.{wb}"] = d[f"{b}attn1.to_out.0.{wb}"]
            sd[f"{layer}mlp.dense_h_to_4h.{wb}"] = d[f"{b}ff.net.0.proj.{wb}"]
            sd[f"{layer}mlp.dense_4h_to_h.{wb}"] = d[f"{b}ff.net.2.{wb}"]
            sd[f"{adaln}query_layernorm_list.{i}.{wb}"] = d[f"{b}attn1.norm_q.{wb}"]
            sd[f"{adaln}key_layernorm_list.{i}.{wb}"] = d[f"{b}attn1.norm_k.{wb}"]
            # SAT's forward unpacks: video (shift, scale, gate) for attention, then for the MLP, then
            # the text stream's six; diffusers' norm1 holds attention video+text, norm2 the MLP's.
            attn, mlp = d[f"{b}norm1.linear.{wb}"].chunk(2), d[f"{b}norm2.linear.{wb}"].chunk(2)
            sd[f"{adaln}adaLN_modulations.{i}.1.{wb}"] = torch.cat([attn[0], mlp[0], attn[1], mlp[1]])
    return sd


def sat_vae(d, up_blocks):
    out = {}
    for key, tensor in d.items():
        name = key.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        name = name.replace("conv_shortcut", "nin_shortcut").replace("downsamplers.0", "downsample")
        name = name.replace("upsamplers.0", "upsample").replace("down_blocks.", "down.").replace(".resnets.", ".block.")
        up = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(.+)", name)
        out[f"decoder.up.{up_blocks - 1 - int(up[1])}.{up[2]}" if up else name] = tensor
    return out


def sat_yaml(variant, lora_alpha=None):
    t = transformer_config(variant)
    rope, learned = t["use_rotary_positional_embeddings"], t["use_learned_positional_embeddings"]
    pos = {"text_length": t["max_text_seq_length"], "hidden_size_head": t["attention_head_dim"]}
    pos.update({"learnable_pos_embed": True} if learned else {})
    # The sincos scale in the mixin's params as CogVideo's 2B yaml has it; for RoPE models (where it
    # has no effect) as a DiffusionTransformer argument, SAT's other place for it.
    scale = {"height_interpolation": 1.875, "width_interpolation": 1.875}
    pos.update({} if rope else scale)
    network = {
        "time_embed_dim": t["time_embed_dim"], "elementwise_affine": True, "num_frames": t["sample_frames"],
        "time_compressed_rate": 4, "latent_width": t["sample_width"], "latent_height": t["sample_height"],
        "num_layers": t["num_layers"], "patch_size": [t["patch_size_t"], 2, 2] if t["patch_size_t"] else 2,
        "in_channels": t["in_channels"], "out_channels": t["out_channels"],
        "hidden_size": t["num_attention_heads"] * t["attention_head_dim"],
        "num_attention_heads": t["num_attention_heads"],
        **(scale if rope else {}),
        "modules": {
            "pos_embed_config": {"target": "dit_video_concat." + ("Rotary3DPositionEmbeddingMixin" if rope
                                                                  else "Basic3DPositionEmbeddingMixin"),
                                 "params": pos},
            "patch_embed_config": {"target": "dit_video_concat.ImagePatchEmbeddingMixin",
                                   "params": {"text_hidden_size": t["text_embed_dim"]}},
            "adaln_layer_config": {"target": "dit_video_concat.AdaLNMixin", "params": {"qk_ln": True}},
            "final_layer_config": {"target": "dit_video_concat.FinalLayerMixin"},
        },
    }
    if t["ofs_embed_dim"]:
        network["ofs_embed_dim"] = t["ofs_embed_dim"]
    if lora_alpha is not None:
        network["modules"]["lora_config"] = {"target": "sat.model.finetune.lora2.LoraMixin",
                                             "params": {"r": RANK, "lora_alpha": lora_alpha}}
    discretization = {"target": "sgm.modules.diffusionmodules.discretizer.ZeroSNRDDPMDiscretization",
                      "params": {"shift_scale": scheduler_config(variant)["snr_shift_scale"]}}
    return {"model": {"scale_factor": vae_config(variant)["scaling_factor"],
                      "denoiser_config": {"params": {"discretization_config": discretization}},
                      "network_config": {"target": "dit_video_concat.DiffusionTransformer", "params": network}}}


def write_sat(root, variant, *, lora=None, lora_alpha=None, args=None, extra=None, saved=None):
    """A SAT directory of the tiny `variant` fixture, with the keys SAT checkpoints carry that hold
    no weight (RoPE tables, the 2B sincos table, text-encoder and VAE copies, the VAE's loss)."""
    folder, t = tiny_folder(variant), transformer_config(variant)
    module = sat_transformer(read(folder, "transformer"), t["num_layers"], lora_wrapped=lora is not None)
    dim = t["num_attention_heads"] * t["attention_head_dim"]
    module[P + "mixins.pos_embed.freqs_sin"] = torch.randn(3, 4, 6, t["attention_head_dim"])
    module["conditioner.embedders.0.transformer.shared.weight"] = torch.randn(8, 32)
    module["first_stage_model.encoder.conv_in.conv.weight"] = torch.randn(8, 3, 3, 3, 3)
    if not t["use_rotary_positional_embeddings"]:
        module[P + "mixins.pos_embed.pos_embedding"] = torch.randn(1, 16 + 72, dim)
    module.update(lora or {})
    module.update(extra or {})
    sat = root / f"sat-{variant}"
    (sat / "transformer" / "1000").mkdir(parents=True)
    (sat / "transformer" / "latest").write_text("1000\n")
    saved_args = args or argparse.Namespace(mode="finetune", base=["cogvideox.yaml"], lr=1e-4, train_iters=1000)
    torch.save({"module": module, "iteration": 1000, "args": saved_args, **(saved or {})},
               sat / "transformer" / "1000" / "mp_rank_00_model_states.pt")
    (sat / "vae").mkdir()
    vae = sat_vae(read(folder, "vae"), len(vae_config(variant)["block_out_channels"]))
    vae["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 3, 3)
    torch.save({"state_dict": vae}, sat / "vae" / "3d-vae.pt")
    (sat / "cogvideox.yaml").write_text(yaml.safe_dump(sat_yaml(variant, lora_alpha)))
    return sat


def frames(pipe):
    return pipe.generate(PROMPT, **GEN).frames


def state_equal(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sat_2b_loads_and_converts_to_the_same_frames(tmp_path):
    folder = tiny_folder("2b")
    sat = write_sat(tmp_path, "2b")
    expected = frames(cvfast.load(folder, device="cpu", backend="reference"))
    loaded = frames(cvfast.load(sat, base=folder, device="cpu", backend="reference"))
    assert loaded.std() > 1e-3 and rel_l2(loaded, expected) <= 1e-6

    out = tmp_path / "converted"
    assert cli_main(["convert-sat", str(sat), str(out), "--base", str(folder)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                     "transformer", "vae"]
    assert rel_l2(frames(cvfast.load(out, device="cpu", backend="reference")), expected) <= 1e-6
    # diffusers reads the converted folder and gives its own frames of the original folder.
    args = ("2b", GEN["seed"], GEN["num_inference_steps"], GEN["guidance_scale"], False)
    theirs = diffusers_frames(out, *args)
    assert rel_l2(theirs, diffusers_frames(folder, *args)) <= 1e-6
    assert rel_l2(theirs, expected) <= 5e-5  # the project's cvfast-vs-diffusers bar


@pytest.mark.parametrize("variant", ["5b", "5b-i2v", "1.5", "1.5-i2v"])
def test_sat_variants_load_and_convert_exactly(tmp_path, variant):
    folder = tiny_folder(variant)
    sat = write_sat(tmp_path, variant)
    original = cvfast.load(folder, device="cpu")
    from_sat = cvfast.load(sat, base=folder, device="cpu")
    assert from_sat.config == original.config
    assert state_equal(from_sat.transformer, original.transformer) and state_equal(from_sat.vae, original.vae)

    out = convert_sat(sat, tmp_path / "converted", base=folder)
    assert state_equal(cvfast.load(out, device="cpu").transformer, original.transformer)
    # diffusers' own transformer from the converted folder: same forward as from the original folder.
    t = transformer_config(variant)
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 2 * (t["patch_size_t"] or 1), t["in_channels"], 8, 12),
                  encoder_hidden_states=torch.randn(1, 16, t["text_embed_dim"]), timestep=torch.tensor([500]))
    if t["ofs_embed_dim"]:
        inputs["ofs"] = torch.tensor([2.0])
    if t["use_learned_positional_embeddings"]:  # only its table's size: 3 latent frames
        inputs["hidden_states"] = torch.randn(1, 3, t["in_channels"], 8, 12)
    outputs = []
    for path in (folder, out):
        model = diffusers.CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer").eval()
        with torch.no_grad():
            outputs.append(model(**inputs, return_dict=False)[0])
    assert outputs[0].std() > 1e-3 and torch.equal(outputs[0], outputs[1])
    vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(out, subfolder="vae")
    assert vae.config.scaling_factor == vae_config(variant)["scaling_factor"]


def test_cli_generates_from_a_sat_dir(tmp_path, capsys):
    folder = tiny_folder("2b")
    sat = write_sat(tmp_path, "2b")
    args = ["generate", "--model", str(sat), "--prompt", PROMPT, "--steps", "1", "--frames", "9", "--height", "48",
            "--width", "80", "--no-progress", "--out", str(tmp_path / "sat.mp4")]
    assert cli_main(args) == 2 and "--base" in capsys.readouterr().err
    assert cli_main(args + ["--base", str(folder)]) == 0 and (tmp_path / "sat.mp4").stat().st_size > 0


def test_unknown_and_missing_sat_tensors_are_listed(tmp_path):
    folder = tiny_folder("2b")
    sat = write_sat(tmp_path, "2b", extra={P + "mixins.adapter.proj.weight": torch.zeros(2)})
    with pytest.raises(WeightError, match=r"mixins\.adapter\.proj\.weight"):
        cvfast.load(sat, base=folder, device="cpu")
    shutil.rmtree(sat)
    sat = write_sat(tmp_path, "2b")
    ckpt = sat / "transformer" / "1000" / "mp_rank_00_model_states.pt"
    saved = torch.load(ckpt, weights_only=False)
    del saved["module"][P + "mixins.adaln_layer.key_layernorm_list.1.bias"]
    torch.save(saved, ckpt)
    with pytest.raises(WeightError, match=r"lacks 1 tensors, e\.g\. transformer_blocks\.1\.attn1\.norm_k\.bias \(diffusers"):
        cvfast.load(sat, base=folder, device="cpu")


def test_sat_dir_needs_base_and_yaml(tmp_path):
    folder = tiny_folder("2b")
    sat = write_sat(tmp_path, "2b")
    with pytest.raises(cvfast.CVFastInputError, match=r"base=None.*THUDM/CogVideoX-5b"):
        cvfast.load(sat, device="cpu")
    with pytest.raises(cvfast.CVFastInputError, match=r"base=.*SAT checkpoint directory"):
        cvfast.load(folder, base=folder, device="cpu")
    (sat / "cogvideox.yaml").unlink()
    with pytest.raises(cvfast.CVFastInputError, match="without its yaml config"):
        cvfast.load(sat, base=folder, device="cpu")


def test_pickle_with_a_foreign_global_is_refused_unless_trusted(tmp_path, capsys):
    folder = tiny_folder("2b")
    sat = write_sat(tmp_path, "2b", args=argparse.Namespace(lr=fractions.Fraction(1, 10000)))
    with pytest.raises(UnsafePickleError, match=r"fractions\.Fraction.*trust_pickle=True.*--trust-pickle"):
        cvfast.load(sat, base=folder, device="cpu")
    assert cli_main(["convert-sat", str(sat), str(tmp_path / "refused"), "--base", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "fractions.Fraction" in err and "--trust-pickle" in err and not (tmp_path / "refused").exists()
    trusted = cvfast.load(sat, base=folder, device="cpu", trust_pickle=True)
    assert state_equal(trusted.transformer, cvfast.load(folder, device="cpu").transformer)
    assert cli_main(["convert-sat", str(sat), str(tmp_path / "ok"), "--base", str(folder), "--trust-pickle"]) == 0


def test_numpy_data_in_a_sat_checkpoint_is_read_without_trusting_it(tmp_path):
    """SAT saves NumPy's random-number state (arrays, dtypes, scalars) beside the weights: data, read
    by the safe unpickler."""
    folder = tiny_folder("2b")
    sat = write_sat(tmp_path, "2b", saved={"np_rng_state": np.random.default_rng(0).random(3),
                                           "legacy_rng": np.random.RandomState(0).get_state(),
                                           "loss_scale": np.float32(65536.0)})
    pipe = cvfast.load(sat, base=folder, device="cpu")
    assert state_equal(pipe.transformer, cvfast.load(folder, device="cpu").transformer)


def random_sat_lora(t, seed=3):
    """SAT LoraMixin tensors on every layer: query_key_value in 3 partitions (q, k, v), dense in 1."""
    g = torch.Generator().manual_seed(seed)
    dim = t["num_attention_heads"] * t["attention_head_dim"]
    lora = {}
    for i in range(t["num_layers"]):
        for layer, parts in (("query_key_value", 3), ("dense", 1)):
            for p in range(parts):
                key = f"{P}transformer.layers.{i}.attention.{layer}"
                lora[f"{key}.matrix_A.{p}"] = torch.randn(RANK, dim, generator=g) / dim ** 0.5
                lora[f"{key}.matrix_B.{p}"] = torch.randn(dim, RANK, generator=g)
    return lora


def merged_folder(root, variant, lora, factor):
    """The tiny folder with W += factor * B @ A computed here, on diffusers' q/k/v/to_out names."""
    folder = shutil.copytree(tiny_folder(variant), root / "merged")
    d = read(folder, "transformer")
    for key, a in lora.items():
        match = re.fullmatch(r".*layers\.(\d+)\.attention\.(\w+)\.matrix_A\.(\d)", key)
        if match:
            name = ("to_q", "to_k", "to_v")[int(match[3])] if match[2] == "query_key_value" else "to_out.0"
            w = f"transformer_blocks.{match[1]}.attn1.{name}.weight"
            d[w] = d[w] + factor * (lora[key.replace("matrix_A", "matrix_B")] @ a)
    save_file(d, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    return folder


def test_sat_lora_equals_independently_merged_weights(tmp_path):
    variant, t = "5b", transformer_config("5b")
    lora = random_sat_lora(t)
    # SAT scales by lora_alpha / r: alpha 2 in the SAT directory's yaml; a lone file gets SAT's
    # default alpha 1, so scale=2.0 there gives the same merged model.
    expected_pipe = cvfast.load(merged_folder(tmp_path, variant, lora, 2.0 / RANK), device="cpu", backend="reference")
    expected = frames(expected_pipe)

    pipe = cvfast.load(tiny_folder(variant), device="cpu", backend="reference")
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    base_frames = frames(pipe)
    lone = tmp_path / "adapter.safetensors"
    save_file({k[len(P):]: v for k, v in lora.items()}, str(lone))  # SAT names, without the engine prefix
    assert pipe.load_lora(lone, scale=2.0) == [f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attn_out", "qkv")]
    ours = frames(pipe)
    assert rel_l2(ours, expected) <= 1e-6 and rel_l2(base_frames, expected) > 1e-2
    pipe.unload_lora()
    assert all(torch.equal(base[k], v) for k, v in pipe.transformer.state_dict().items())

    # The same adapter inside a SAT fine-tune checkpoint (LoraLinear: .original weights + matrices),
    # merged at load time; unload_lora() gives the base model back bit for bit.
    sat = write_sat(tmp_path, variant, lora=lora, lora_alpha=2.0)
    fine_tuned = cvfast.load(sat, base=tiny_folder(variant), device="cpu", backend="reference")
    assert state_equal(fine_tuned.transformer, expected_pipe.transformer)
    fine_tuned.unload_lora()
    assert all(torch.equal(base[k], v) for k, v in fine_tuned.transformer.state_dict().items())
    # ... also as a pickle file given to load_lora (read with the allowlist) and through convert-sat.
    pipe.load_lora(sat / "transformer" / "1000" / "mp_rank_00_model_states.pt", scale=2.0)
    assert state_equal(pipe.transformer, expected_pipe.transformer)
    out = convert_sat(sat, tmp_path / "converted", base=tiny_folder(variant))
    assert state_equal(cvfast.load(out, device="cpu").transformer, expected_pipe.transformer)


def _lora_file(tmp_path, tensors):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    return path


QKV = "transformer.layers.0.attention.query_key_value"


@pytest.mark.parametrize("tensors,match", [
    ({"transformer.layers.7.attention.dense.matrix_A.0": torch.zeros(3, 32),
      "transformer.layers.7.attention.dense.matrix_B.0": torch.zeros(32, 3)},
     r"transformer\.layers\.7\.attention\.dense partition 0 \(to_out\.0\).*no such layer"),
    ({f"{QKV}.matrix_A.1": torch.zeros(3, 32), f"{QKV}.matrix_B.1": torch.zeros(32, 2)},
     r"partition 1.*'A': \(3, 32\), 'B': \(32, 2\)"),
    ({f"{QKV}.matrix_A.0": torch.zeros(3, 48), f"{QKV}.matrix_B.0": torch.zeros(48, 3)},
     r"query_key_value partition 0 \(to_q\) \(delta \(48, 48\), model: \(32, 32\)\)"),
    ({"transformer.layers.0.cross_attention.query.matrix_A.0": torch.zeros(3, 32),
      "transformer.layers.0.cross_attention.query.matrix_B.0": torch.zeros(32, 3)},
     "not on a CogVideoX attention layer.*cross_attention"),
    ({f"{QKV}.matrix_A.3": torch.zeros(3, 32), f"{QKV}.matrix_B.3": torch.zeros(32, 3)},
     r"partitions 0-2.*matrix_A\.3"),
])
def test_sat_adapters_that_do_not_fit_are_refused_before_any_change(tmp_path, tensors, match):
    pipe = cvfast.load(tiny_folder("5b"), device="cpu")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(LoRAError, match=match):
        pipe.load_lora(_lora_file(tmp_path, tensors))
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())


def test_converted_folder_is_not_written_over(tmp_path):
    sat = write_sat(tmp_path, "2b")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(cvfast.CVFastInputError, match="out_dir=.*nothing is overwritten"):
        convert_sat(sat, tmp_path / "taken", base=tiny_folder("2b"))
    assert np.array_equal(sorted(p.name for p in (tmp_path / "taken").iterdir()), ["keep.txt"])
