"""diffusers/PEFT-format LoRA merged at load time, against diffusers' load_lora_weights + fuse_lora."""
import pytest
import torch
from safetensors.torch import save_file

import cvfast
from cvfast import LoRAError
from tests.fixtures import tiny_folder
from tests.test_pipeline import PROMPT, SIZE
from tests.numerics import rel_l2
from tests.extras import require

diffusers = require("diffusers")
peft = require("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "proj_out"]


def saved_lora(folder, seed: int, rank: int, alpha: int, targets: list[str]):
    """A random LoRA on the tiny 5B-like model's `targets`, saved by diffusers into `folder` with its
    adapter metadata (so alpha travels in the file)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    pipe = diffusers.CogVideoXPipeline.from_pretrained(tiny_folder("5b", "ddim"))
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets)
    pipe.transformer.add_adapter(config)
    diffusers.CogVideoXPipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A random rank-4, alpha-8 LoRA on most linear layers."""
    return saved_lora(tmp_path_factory.mktemp("lora"), 7, 4, 8, TARGETS)


def test_merged_lora_matches_diffusers_fuse_lora(lora_file):
    folder = tiny_folder("5b", "ddim")
    kw = dict(num_inference_steps=3, guidance_scale=6.0, **SIZE)
    ref = diffusers.CogVideoXPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(lora_file)
    ref.fuse_lora(lora_scale=0.7)
    expected = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(3), output_type="np",
                   max_sequence_length=16, **kw).frames
    pipe = cvfast.load(folder, device="cpu", dtype=torch.float32, backend="reference")
    base = pipe.generate(PROMPT, seed=3, progress=False, **kw).frames
    changed = pipe.load_lora(lora_file, scale=0.7)
    assert "blocks.0.qkv.weight" in changed and "proj_out.weight" in changed
    ours = pipe.generate(PROMPT, seed=3, progress=False, **kw).frames
    assert rel_l2(ours, expected) <= 5e-5
    assert rel_l2(base, expected) > 1e-2  # the adapter really changes the video


def test_unload_restores_base_weights_bit_for_bit(lora_file):
    pipe = cvfast.load(tiny_folder("5b", "ddim"), device="cpu")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora(lora_file)
    pipe.load_lora(lora_file, scale=-0.5)  # stacking two
    assert not torch.equal(before["blocks.1.qkv.weight"], pipe.transformer.state_dict()["blocks.1.qkv.weight"])
    pipe.unload_lora()
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _write(path, tensors):
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("tensors,match", [
    ({"transformer.transformer_blocks.0.attn1.to_z.lora_A.weight": torch.zeros(4, 32),
      "transformer.transformer_blocks.0.attn1.to_z.lora_B.weight": torch.zeros(32, 4)}, "to_z.*no such layer"),
    ({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
      "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2)}, "rank 4 and lora_B rank 2"),
    ({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 48),
      "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)}, r"delta \(32, 48\)"),
    ({"text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(4, 32)}, "not a transformer LoRA"),
    ({"transformer.proj_out.lora_A.weight": torch.zeros(4, 32)}, "lora_A only"),
])
def test_adapters_that_do_not_fit_are_refused_before_any_change(tmp_path, tensors, match):
    pipe = cvfast.load(tiny_folder("5b", "ddim"), device="cpu")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(LoRAError, match=match):
        pipe.load_lora(_write(tmp_path / "bad.safetensors", tensors))
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())


def test_alpha_tensor_and_default_alpha(tmp_path):
    """kohya-style `.alpha` tensors win; without alpha anywhere the scaling is 1 (alpha = r)."""
    pipe = cvfast.load(tiny_folder("5b", "ddim"), device="cpu")
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    key = "transformer.transformer_blocks.0.attn1.to_out.0"
    base = pipe.transformer.blocks[0].attn_out.weight.clone()
    pipe.load_lora(_write(tmp_path / "plain.safetensors", {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}))
    torch.testing.assert_close(pipe.transformer.blocks[0].attn_out.weight, base + b @ a)
    pipe.unload_lora()
    pipe.load_lora(_write(tmp_path / "alpha.safetensors", {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b,
                                                           f"{key}.alpha": torch.tensor(1.0)}), scale=2.0)
    torch.testing.assert_close(pipe.transformer.blocks[0].attn_out.weight, base + 2.0 * 0.5 * b @ a)


def test_cli_lora(tmp_path):
    import subprocess
    import sys
    good = _write(tmp_path / "tiny_lora.safetensors", {"transformer.proj_out.lora_A.weight": torch.randn(2, 64),
                                                       "transformer.proj_out.lora_B.weight": torch.randn(16, 2)})
    base = [sys.executable, "-m", "cvfast", "generate", "--prompt", "a cat", "--steps", "1", "--no-progress"]
    proc = subprocess.run(base + ["--lora", str(good), "--lora-scale", "0.5", "--out", str(tmp_path / "a.mp4")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    bad = _write(tmp_path / "bad.safetensors", {"transformer.proj_out.lora_A.weight": torch.randn(2, 48),
                                                "transformer.proj_out.lora_B.weight": torch.randn(16, 2)})
    proc = subprocess.run(base + ["--lora", str(bad), "--out", str(tmp_path / "b.mp4")], capture_output=True, text=True)
    assert proc.returncode == 2 and "proj_out" in proc.stderr and "Traceback" not in proc.stderr


# -- adapter names, set_adapters, weight_name, hub ids (diffusers' LoRA API) --------------------------

@pytest.fixture(scope="module")
def second_lora(tmp_path_factory):
    """Another random LoRA (rank 2, alpha 2) on the attention layers only."""
    return saved_lora(tmp_path_factory.mktemp("lora2"), 8, 2, 2, ["to_q", "to_v", "to_out.0"])


def test_set_adapters_matches_diffusers(lora_file, second_lora):
    """Two named adapters with weights 0.7 and -1.5, as diffusers runs them (PEFT, unfused)."""
    folder = tiny_folder("5b", "ddim")
    kw = dict(num_inference_steps=3, guidance_scale=6.0, **SIZE)
    ref = diffusers.CogVideoXPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(lora_file, adapter_name="style")
    ref.load_lora_weights(second_lora, adapter_name="motion")
    ref.set_adapters(["style", "motion"], [0.7, -1.5])
    expected = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(3), output_type="np",
                   max_sequence_length=16, **kw).frames
    pipe = cvfast.load(folder, device="cpu", dtype=torch.float32, backend="reference")
    pipe.load_lora(lora_file, adapter_name="style")
    pipe.load_lora(second_lora.parent, adapter_name="motion")  # a folder: diffusers' file name in it
    pipe.set_adapters(["style", "motion"], [0.7, -1.5])
    assert pipe.active_adapters() == {"style": 0.7, "motion": -1.5}
    ours = pipe.generate(PROMPT, seed=3, progress=False, **kw).frames
    assert rel_l2(ours, expected) <= 5e-5


def test_adapters_switch_and_unload_one_at_a_time(lora_file, second_lora):
    """Weights are always base + the active adapters: switching or removing one gives bit for bit
    what loading the remaining ones alone gives."""
    folder = tiny_folder("5b", "ddim")
    alone = cvfast.load(folder, device="cpu")
    alone.load_lora(second_lora, 0.5)
    want = {k: v.clone() for k, v in alone.transformer.state_dict().items()}
    pipe = cvfast.load(folder, device="cpu")
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora(lora_file)
    pipe.load_lora(second_lora, 0.5)
    assert set(pipe.active_adapters()) == {"default_0", "default_1"}
    pipe.set_adapters("default_1", 0.5)  # default_0 stays loaded, inactive
    assert all(torch.equal(want[k], v) for k, v in pipe.transformer.state_dict().items())
    pipe.set_adapters(["default_0", "default_1"], [1.0, 0.5])
    pipe.unload_lora("default_0")
    assert pipe.active_adapters() == {"default_1": 0.5}
    assert all(torch.equal(want[k], v) for k, v in pipe.transformer.state_dict().items())
    pipe.unload_lora()
    assert pipe.active_adapters() == {}
    assert all(torch.equal(base[k], v) for k, v in pipe.transformer.state_dict().items())


def test_adapter_names_and_weights_are_checked(lora_file):
    pipe = cvfast.load(tiny_folder("5b", "ddim"), device="cpu")
    pipe.load_lora(lora_file, adapter_name="style")
    with pytest.raises(cvfast.CVFastInputError, match=r"adapter_name='style' is not accepted: a new non-empty name"):
        pipe.load_lora(lora_file, adapter_name="style")
    with pytest.raises(cvfast.CVFastInputError, match=r"adapter_names=\['motion'\] is not accepted: names of loaded"):
        pipe.set_adapters(["motion"])
    with pytest.raises(cvfast.CVFastInputError, match="adapter_weights=.* one weight per adapter name"):
        pipe.set_adapters(["style"], [1.0, 2.0])


def test_weight_name_picks_a_file_in_a_folder(tmp_path, lora_file):
    key = "transformer.proj_out"
    _write(tmp_path / "a.safetensors", {f"{key}.lora_A.weight": torch.randn(2, 32),
                                        f"{key}.lora_B.weight": torch.randn(16, 2)})
    _write(tmp_path / "b.safetensors", {f"{key}.lora_A.weight": torch.randn(2, 32),
                                        f"{key}.lora_B.weight": torch.randn(16, 2)})
    pipe = cvfast.load(tiny_folder("5b", "ddim"), device="cpu")
    with pytest.raises(LoRAError, match=r"expected one \*.safetensors LoRA file.*weight_name= picks one"):
        pipe.load_lora(tmp_path)
    assert pipe.load_lora(tmp_path, weight_name="b.safetensors") == ["proj_out.weight"]
    with pytest.raises(cvfast.CVFastInputError, match="weight_name='c.safetensors' is not accepted: a file in"):
        pipe.load_lora(tmp_path, weight_name="c.safetensors")
    with pytest.raises(cvfast.CVFastInputError, match="weight_name='x' is not accepted: None when the LoRA is a file"):
        pipe.load_lora(lora_file, weight_name="x")


def test_a_hub_id_that_cannot_be_fetched_names_the_lora(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = cvfast.load(tiny_folder("5b", "ddim"), device="cpu")
    with pytest.raises(cvfast.CVFastInputError, match=r"lora='nobody-here/no-such-lora' could not be fetched from the "
                                                      r"Hugging Face hub"):
        pipe.load_lora("nobody-here/no-such-lora")


def test_attention_kwargs_scale_matches_diffusers_for_one_call(lora_file, second_lora):
    """diffusers' attention_kwargs={"scale": s} scales the active LoRAs for that call; after it the
    weights are as they were, bit for bit."""
    folder = tiny_folder("5b", "ddim")
    kw = dict(num_inference_steps=3, guidance_scale=6.0, output_type="np", max_sequence_length=16, **SIZE)
    ref = diffusers.CogVideoXPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(lora_file, adapter_name="style")
    ref.load_lora_weights(second_lora, adapter_name="motion")
    ref.set_adapters(["style", "motion"], [0.7, -1.5])
    expected = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(3), attention_kwargs={"scale": 0.4},
                   **kw).frames
    pipe = cvfast.load(folder, device="cpu", dtype=torch.float32, backend="reference")
    pipe.load_lora(lora_file, 0.7, adapter_name="style")
    pipe.load_lora(second_lora, -1.5, adapter_name="motion")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    got = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(3), attention_kwargs={"scale": 0.4}, **kw).frames
    assert rel_l2(got, expected) <= 5e-5
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    assert pipe.active_adapters() == {"style": 0.7, "motion": -1.5}
