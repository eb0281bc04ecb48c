"""Tiny, random-weight CogVideoX model folders in the exact diffusers layout.

Everything is generated locally (no hub downloads):

    folder/
      model_index.json
      scheduler/scheduler_config.json
      tokenizer/{spiece.model, tokenizer.json, tokenizer_config.json}
      text_encoder/{config.json, model.safetensors}           (T5EncoderModel)
      transformer/{config.json, diffusion_pytorch_model.safetensors}
                  (or sharded: diffusion_pytorch_model-0000k-of-0000N.safetensors
                   + diffusion_pytorch_model.safetensors.index.json)
      vae/{config.json, diffusion_pytorch_model.safetensors}

Main API:

    make_tiny_folder(root, variant, scheduler="ddim", *, shard=False, ...) -> Path
    tiny_folder(variant, scheduler="ddim", **kw) -> Path   # cached per process, treat as READ-ONLY

Every parameter (and the learned positional-embedding buffer) is re-initialised
with seeded, non-trivial random values (norm weights = 1 + noise, biases = small
noise, matrices = N(0, 1/fan_in)), so that a wrong mapping of ANY tensor changes
the output.  The default diffusers init leaves several tensors at exactly zero /
one, which would hide such bugs.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import torch

# Everything here is local; never let a loader try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# --------------------------------------------------------------------------------------
# Shared tiny sizes
# --------------------------------------------------------------------------------------

MAX_TEXT_SEQ_LEN = 16          # transformer max_text_seq_length == tokenizer.model_max_length
T5_D_MODEL = 32                # == transformer text_embed_dim
LATENT_CHANNELS = 4
VAE_SPATIAL = 8                # 2 ** (len(block_out_channels) - 1)
VAE_TEMPORAL = 4               # temporal_compression_ratio

# Default generation size that works for every variant (latent 3 x 8 x 12).
TINY_FRAMES = 9
TINY_HEIGHT = 64
TINY_WIDTH = 96

T5_CONFIG = dict(
    d_model=T5_D_MODEL,
    d_kv=8,
    num_heads=4,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",   # T5 v1.1 -> dense_act_fn "gelu_new", is_gated_act True
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
    tie_word_embeddings=False,
    is_encoder_decoder=True,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    latent_channels=LATENT_CHANNELS,
    layers_per_block=1,
    act_fn="silu",
    norm_eps=1e-6,
    norm_num_groups=4,
    temporal_compression_ratio=VAE_TEMPORAL,
    # Only used for tiling defaults: tile_sample_min = (32, 48), tile_latent_min = (4, 6).
    sample_height=TINY_HEIGHT,
    sample_width=TINY_WIDTH,
    use_quant_conv=False,
    use_post_quant_conv=False,
    # per-variant: scaling_factor, invert_scale_latents
)

TRANSFORMER_BASE = dict(
    num_attention_heads=2,
    attention_head_dim=16,          # RoPE splits 16 -> t:4, h:6, w:6 (all even)
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    flip_sin_to_cos=True,
    freq_shift=0,
    time_embed_dim=16,
    ofs_embed_dim=None,
    text_embed_dim=T5_D_MODEL,
    num_layers=2,
    dropout=0.0,
    attention_bias=True,
    sample_width=12,                # LATENT width  (pixels 96)
    sample_height=8,                # LATENT height (pixels 64)
    sample_frames=9,                # PIXEL frames  ((9-1)//4+1 = 3 latent frames)
    patch_size=2,
    patch_size_t=None,
    temporal_compression_ratio=VAE_TEMPORAL,
    max_text_seq_length=MAX_TEXT_SEQ_LEN,
    activation_fn="gelu-approximate",
    timestep_activation_fn="silu",
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=False,
    use_learned_positional_embeddings=False,
    patch_bias=True,
)

SCHEDULER_BASE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="v_prediction",
    clip_sample_range=1.0,
    sample_max_value=1.0,
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
    # per-variant: snr_shift_scale
)

# Per-variant overrides.  "pipeline" is the model_index.json _class_name.
VARIANTS: dict[str, dict] = {
    "2b": dict(
        pipeline="CogVideoXPipeline",
        transformer=dict(),
        vae=dict(scaling_factor=1.15258426, invert_scale_latents=False),
        scheduler=dict(snr_shift_scale=3.0),
    ),
    "5b": dict(
        pipeline="CogVideoXPipeline",
        transformer=dict(use_rotary_positional_embeddings=True),
        vae=dict(scaling_factor=0.7, invert_scale_latents=False),
        scheduler=dict(snr_shift_scale=1.0),
    ),
    "5b-i2v": dict(
        pipeline="CogVideoXImageToVideoPipeline",
        transformer=dict(
            in_channels=2 * LATENT_CHANNELS,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=True,  # only valid at exactly 9 x 64 x 96
        ),
        vae=dict(scaling_factor=0.7, invert_scale_latents=False),
        scheduler=dict(snr_shift_scale=1.0),
    ),
    "1.5": dict(
        pipeline="CogVideoXPipeline",
        transformer=dict(
            use_rotary_positional_embeddings=True,
            patch_size_t=2,
            patch_bias=False,
            # Like the real 300x300: RoPE max grid (8x8) larger than the generation grid (4x6),
            # so the "slice" RoPE path is exercised.  Pipeline default size would be 128x128.
            sample_height=16,
            sample_width=16,
        ),
        vae=dict(scaling_factor=0.7, invert_scale_latents=True),
        scheduler=dict(snr_shift_scale=1.0),
    ),
    "1.5-i2v": dict(
        pipeline="CogVideoXImageToVideoPipeline",
        transformer=dict(
            in_channels=2 * LATENT_CHANNELS,
            ofs_embed_dim=16,   # must equal time_embed_dim (ofs_emb is added to temb)
            use_rotary_positional_embeddings=True,
            patch_size_t=2,
            patch_bias=False,
            sample_height=16,
            sample_width=16,
        ),
        vae=dict(scaling_factor=0.7, invert_scale_latents=True),
        scheduler=dict(snr_shift_scale=1.0),
    ),
}

SCHEDULERS = {"ddim": "CogVideoXDDIMScheduler", "dpm": "CogVideoXDPMScheduler"}


def transformer_config(variant: str) -> dict:
    cfg = dict(TRANSFORMER_BASE)
    cfg.update(VARIANTS[variant]["transformer"])
    return cfg


def vae_config(variant: str) -> dict:
    cfg = dict(VAE_CONFIG)
    cfg.update(VARIANTS[variant]["vae"])
    return cfg


def scheduler_config(variant: str) -> dict:
    cfg = dict(SCHEDULER_BASE)
    cfg.update(VARIANTS[variant]["scheduler"])
    return cfg


def pipeline_class(variant: str):
    import diffusers

    return getattr(diffusers, VARIANTS[variant]["pipeline"])


# --------------------------------------------------------------------------------------
# Tokenizer: tiny sentencepiece unigram model trained on the fly
# --------------------------------------------------------------------------------------

_SENTENCES = """a cat sits on the mat
a dog runs in the park
the quick brown fox jumps over the lazy dog
a panda plays guitar in a bamboo forest
the sun sets over the ocean with golden light
a man walks down a busy city street at night
waves crash against the rocky shore
a red car drives along a mountain road
children play soccer on a green field
snow falls gently on a quiet village
a bird flies high above the clouds
an old woman reads a book by the window
a little boat floats on a calm lake
fireworks explode in the dark sky
a horse gallops across an open meadow
rain drops fall on a glass window
a chef cooks pasta in a small kitchen
a robot dances on a shiny stage
two friends laugh while drinking coffee
a train moves slowly through the desert
flowers bloom in a colorful spring garden
a astronaut floats inside a space station
a girl rides a bicycle near the river
leaves turn orange and yellow in autumn
a candle flickers on a wooden table
the city skyline glows with neon lights
a turtle swims through a coral reef
a musician plays piano in a jazz club
a butterfly lands on a purple flower
a waterfall pours into a deep blue pool
a knight rides a white horse into battle
steam rises from a hot cup of tea
a kitten chases a ball of yarn
lightning strikes over the dark hills
a family eats dinner around a big table
an eagle soars over snowy mountains
a painter draws a portrait with bright colors
a small village wakes up in the morning fog
a fish jumps out of the water
people dance at a festival under the stars""".splitlines()

SPM_VOCAB_SIZE = 128
T5_EXTRA_IDS = 100
TOKENIZER_LEN = SPM_VOCAB_SIZE + T5_EXTRA_IDS          # 228
T5_VOCAB_SIZE = 240   # > TOKENIZER_LEN, like the real 32128 > 32100 (padded embedding rows)

_spm_lock = threading.Lock()
_spm_bytes: bytes | None = None


def train_spiece_model() -> bytes:
    """Train (once per process, deterministic) a tiny T5-style sentencepiece unigram model.

    pad=0 "<pad>", eos=1 "</s>", unk=2 "<unk>", no bos; nmt_nfkc normalisation (like T5).
    """
    global _spm_bytes
    with _spm_lock:
        if _spm_bytes is None:
            import sentencepiece as spm

            buf = io.BytesIO()
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(_SENTENCES),
                model_writer=buf,
                vocab_size=SPM_VOCAB_SIZE,
                model_type="unigram",
                pad_id=0,
                eos_id=1,
                unk_id=2,
                bos_id=-1,
                pad_piece="<pad>",
                eos_piece="</s>",
                unk_piece="<unk>",
                character_coverage=1.0,
                num_threads=1,
                minloglevel=2,
            )
            _spm_bytes = buf.getvalue()
        return _spm_bytes


def _pb_varint(b: bytes, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def _pb_fields(b: bytes):
    i = 0
    while i < len(b):
        key, i = _pb_varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _pb_varint(b, i)
        elif wire == 1:
            v, i = b[i : i + 8], i + 8
        elif wire == 5:
            v, i = b[i : i + 4], i + 4
        elif wire == 2:
            n, i = _pb_varint(b, i)
            v, i = b[i : i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, v


def spm_precompiled_charsmap(model_bytes: bytes) -> bytes | None:
    """ModelProto.normalizer_spec (field 3) .precompiled_charsmap (field 2), parsed without protobuf."""
    for f, v in _pb_fields(model_bytes):
        if f == 3:
            for g, w in _pb_fields(v):
                if g == 2:
                    return bytes(w)
    return None


def write_tokenizer(out_dir: Path, *, tokenizer_json: bool = True) -> Path:
    """Write a T5 tokenizer folder.

    Always writes ``spiece.model`` (the sentencepiece model, as real CogVideoX folders ship)
    and ``tokenizer_config.json``.  With ``tokenizer_json=True`` (default) also writes the
    ``tokenizer.json`` produced by transformers-5 ``T5Tokenizer.save_pretrained``; this is
    what makes offline loading work without ``protobuf`` (transformers 5 needs protobuf to
    convert a spiece.model-only folder).  ``tokenizer_json=False`` gives the real
    CogVideoX layout (spiece.model + tokenizer_config.json only).
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mb = train_spiece_model()
    sp = spm.SentencePieceProcessor(model_proto=mb)
    # Same construction transformers 5 does when converting spiece.model (SentencePieceExtractor),
    # plus the sentinels appended in reverse order like the slow T5 tokenizer
    # (<extra_id_99> = 128 ... <extra_id_0> = 227, mirroring 32000 ... 32099).
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(T5_EXTRA_IDS - 1, -1, -1)]
    tok = T5Tokenizer(
        vocab=vocab,
        _spm_precompiled_charsmap=spm_precompiled_charsmap(mb),
        extra_ids=T5_EXTRA_IDS,
        model_max_length=MAX_TEXT_SEQ_LEN,
        legacy=True,
    )
    tok.save_pretrained(str(out_dir))
    (out_dir / "spiece.model").write_bytes(mb)
    if not tokenizer_json:
        (out_dir / "tokenizer.json").unlink()
        cfg_path = out_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("backend", None)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------
# Random re-initialisation
# --------------------------------------------------------------------------------------

_NORM_NAMES = ("LayerNorm", "GroupNorm", "RMSNorm", "BatchNorm")


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, *, embed_std: float = 0.5) -> torch.nn.Module:
    """Re-initialise EVERY parameter with seeded non-trivial noise (deterministic, in fp32)."""
    g = torch.Generator().manual_seed(seed)

    def rn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    seen = set()
    for mname, module in model.named_modules():
        is_norm = any(n in type(module).__name__ for n in _NORM_NAMES)
        is_embed = isinstance(module, torch.nn.Embedding)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied
                continue
            seen.add(id(p))
            if is_norm and pname == "weight":
                v = 1.0 + 0.1 * rn(p.shape)
            elif is_embed:
                v = embed_std * rn(p.shape)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                v = rn(p.shape) / math.sqrt(fan_in)
            else:  # biases, norm biases, other vectors
                v = 0.1 * rn(p.shape)
            p.copy_(v.to(p.dtype))
    for p in model.parameters():
        assert p.float().std() > 0 or p.numel() == 1, "parameter left trivial"
    return model


# --------------------------------------------------------------------------------------
# Folder writer
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """Silence diffusers/transformers warnings and progress bars while writing (restored after)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    try:
        for m, _, _ in saved:
            m.set_verbosity_error()
            m.disable_progress_bar()
        yield
    finally:
        for m, verbosity, bar in saved:
            m.set_verbosity(verbosity)
            if bar:
                m.enable_progress_bar()


def _shard_size(shard) -> str | None:
    if shard is False or shard is None:
        return None
    if shard is True:
        return "40KB"
    return shard


def make_tiny_folder(
    root: Path,
    variant: str,
    scheduler: str = "ddim",
    *,
    shard: bool | str = False,
    shard_text_encoder: bool | str = False,
    vae_dtype: torch.dtype = torch.float32,
    transformer_dtype: torch.dtype = torch.float32,
    text_encoder_dtype: torch.dtype = torch.float32,
    tokenizer_json: bool = True,
    seed: int = 0,
    name: str | None = None,
    transformer_overrides: dict | None = None,
) -> Path:
    """Write a complete tiny random CogVideoX folder under ``root`` and return its path.

    variant: "2b" | "5b" | "5b-i2v" | "1.5" | "1.5-i2v"
    scheduler: "ddim" (CogVideoXDDIMScheduler) | "dpm" (CogVideoXDPMScheduler), same config.
    shard: False, True (= "40KB") or a max_shard_size string -> sharded transformer with
        diffusion_pytorch_model.safetensors.index.json.
    shard_text_encoder: same for text_encoder (model.safetensors.index.json), as real folders ship.
    tokenizer_json: False -> real CogVideoX layout (spiece.model only; transformers 5 then
        needs protobuf to load it).
    transformer_overrides: transformer config entries to change, e.g. {"num_attention_heads": 4}.
    Deterministic for a given (variant, seed); the folder is written atomically.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {sorted(SCHEDULERS)}")

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / (name or f"tiny-cogvideox-{variant}-{scheduler}")
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # fork_rng: module construction must not disturb the caller's global RNG state
        with _quiet(), torch.random.fork_rng(devices=[]):
            # tokenizer
            write_tokenizer(tmp / "tokenizer", tokenizer_json=tokenizer_json)

            # text encoder
            te = T5EncoderModel(T5Config(vocab_size=T5_VOCAB_SIZE, **T5_CONFIG)).eval()
            randomize_(te, seed * 1000 + 1)
            te_kw = {}
            if _shard_size(shard_text_encoder):
                te_kw["max_shard_size"] = _shard_size(shard_text_encoder)
            te.to(text_encoder_dtype).save_pretrained(str(tmp / "text_encoder"), safe_serialization=True, **te_kw)

            # vae
            vae = AutoencoderKLCogVideoX(**vae_config(variant)).eval()
            randomize_(vae, seed * 1000 + 2)
            with torch.no_grad():  # halve the decoder output so fewer pixels saturate in [-1, 1]
                vae.decoder.conv_out.conv.weight.mul_(0.5)
                vae.decoder.conv_out.conv.bias.mul_(0.5)
            vae.to(vae_dtype).save_pretrained(str(tmp / "vae"), safe_serialization=True)

            # transformer
            tcfg = transformer_config(variant) | (transformer_overrides or {})
            tr = CogVideoXTransformer3DModel(**tcfg).eval()
            randomize_(tr, seed * 1000 + 3)
            if tcfg["use_learned_positional_embeddings"]:
                # persistent learned buffer -> random too (keep O(1))
                pe = tr.patch_embed.pos_embedding
                g = torch.Generator().manual_seed(seed * 1000 + 4)
                pe.copy_(0.5 * torch.randn(pe.shape, generator=g, dtype=torch.float32))
            tr_kw = {}
            if _shard_size(shard):
                tr_kw["max_shard_size"] = _shard_size(shard)
            tr.to(transformer_dtype).save_pretrained(str(tmp / "transformer"), safe_serialization=True, **tr_kw)

            # scheduler
            sched_cls = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}[scheduler]
            sched_cls(**scheduler_config(variant)).save_pretrained(str(tmp / "scheduler"))

            # model_index.json (same content as DiffusionPipeline.save_pretrained writes)
            import diffusers

            index = {
                "_class_name": VARIANTS[variant]["pipeline"],
                "_diffusers_version": diffusers.__version__,
                "scheduler": ["diffusers", SCHEDULERS[scheduler]],
                "text_encoder": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "T5Tokenizer"],
                "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
                "vae": ["diffusers", "AutoencoderKLCogVideoX"],
            }
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------------------
# Per-process cache
# --------------------------------------------------------------------------------------

_cache: dict[tuple, Path] = {}
_cache_lock = threading.Lock()
_cache_root: Path | None = None


def _session_root() -> Path:
    global _cache_root
    if _cache_root is None:
        _cache_root = Path(tempfile.mkdtemp(prefix="cvfast-tiny-"))
        atexit.register(shutil.rmtree, str(_cache_root), True)
    return _cache_root


def tiny_folder(variant: str, scheduler: str = "ddim", **kwargs) -> Path:
    """Cached ``make_tiny_folder`` in a per-process temp dir (removed at exit).

    Shared between tests: treat the returned folder as READ-ONLY (copy it with
    ``shutil.copytree`` if a test needs to modify files).
    """
    key = (variant, scheduler, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    with _cache_lock:
        path = _cache.get(key)
        if path is None or not path.exists():
            name = f"{variant}-{scheduler}-{len(_cache)}"
            path = make_tiny_folder(_session_root(), variant, scheduler, name=name, **kwargs)
            _cache[key] = path
        return path


__all__ = [
    "MAX_TEXT_SEQ_LEN", "T5_D_MODEL", "LATENT_CHANNELS", "VAE_SPATIAL", "VAE_TEMPORAL",
    "TINY_FRAMES", "TINY_HEIGHT", "TINY_WIDTH", "T5_CONFIG", "VAE_CONFIG", "TRANSFORMER_BASE",
    "SCHEDULER_BASE", "VARIANTS", "SCHEDULERS", "SPM_VOCAB_SIZE", "T5_EXTRA_IDS", "TOKENIZER_LEN",
    "T5_VOCAB_SIZE", "transformer_config", "vae_config", "scheduler_config", "pipeline_class",
    "train_spiece_model", "spm_precompiled_charsmap", "write_tokenizer", "randomize_",
    "make_tiny_folder", "tiny_folder",
]
