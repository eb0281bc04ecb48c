"""The embedded `tiny` model: CogVideoX's real architecture (5B-style RoPE transformer, causal 3D VAE,
T5 encoder, DDIM v-prediction scheduler) at toy widths with seeded random weights.

It runs on a CPU in seconds and its video is noise: it exists for the demo, smoke tests and
benchmarks, never for output quality. Nothing is downloaded.
"""
from __future__ import annotations

import string
from collections.abc import Callable

import torch

from ..models.config import TransformerConfig, VAEConfig
from ..models.text_encoder import TextEncoder
from ..models.transformer import CogVideoXTransformer
from ..models.vae import CogVideoXVAE
from ..sampler.schedulers import SchedulerConfig
from .checkpoint import Checkpoint, Tensors

SEED = 20240806  # fixed: "tiny" is the same model on every machine
TEXT_DIM = 32
TRANSFORMER = TransformerConfig(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                                time_embed_dim=32, text_embed_dim=TEXT_DIM, num_layers=2, sample_height=8,
                                sample_width=12, sample_frames=9, max_text_seq_length=226,
                                use_rotary_positional_embeddings=True)
VAE = VAEConfig.from_dict(dict(block_out_channels=[16, 32, 32, 32], norm_num_groups=8, layers_per_block=1,
                               latent_channels=4, scaling_factor=0.7, sample_height=64, sample_width=96))
SCHEDULER = SchedulerConfig(kind="ddim", snr_shift_scale=1.0)
DEFAULTS = dict(num_frames=9, height=64, width=96, fps=8)


def char_tokenizer():
    """A character-level tokenizer with T5's special ids (pad 0, eos 1, unk 2), built in memory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    chars = string.ascii_letters + string.digits + string.punctuation + " "
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return T5EncoderModel(cfg)


def state(module: torch.nn.Module) -> Tensors:
    return {key: (tensor, f"tiny:{key}") for key, tensor in module.state_dict().items()}


def tiny_checkpoint(check: Callable[[TransformerConfig], None]) -> Checkpoint:
    """The tiny model: every module built here with the fixed seed (they are a few MB), handed to the
    assembler like any checkpoint's tensors; `check` sees the transformer config first."""
    check(TRANSFORMER)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        tokenizer = char_tokenizer()
        t5 = text_encoder(len(tokenizer))
        transformer = CogVideoXTransformer(TRANSFORMER)
        vae = CogVideoXVAE(VAE)

    def encoder(device: torch.device, dtype: torch.dtype) -> TextEncoder:
        return TextEncoder(tokenizer, t5.to(device=device, dtype=dtype).eval().requires_grad_(False))
    return Checkpoint(name="tiny", transformer=TRANSFORMER, vae=VAE, scheduler=SCHEDULER,
                      transformer_tensors=lambda: state(transformer), vae_tensors=lambda: state(vae),
                      text_encoder=encoder, defaults=dict(DEFAULTS))
