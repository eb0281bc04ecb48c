"""`cvfast.load()`: a Pipeline from a diffusers-layout folder, a Hugging Face hub id, or "tiny"."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import parallel as par
from .errors import CVFastInputError, bad_arg
from .models.config import GENERATION_DEFAULTS, TransformerConfig
from .models.text_encoder import TextEncoder
from .models.transformer import CogVideoXTransformer
from .models.vae import CogVideoXVAE, VAEConfig
from .models.weights import load_into, read_tensors, transformer_state_dict
from .ops import OpSet, resolve
from .pipeline import OFFLOAD_CHOICES, Pipeline
from .sampler.graph import check_setting as check_cuda_graph
from .sampler.schedulers import SchedulerConfig

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# What a snapshot of a hub repo needs: configs, safetensors, tokenizer files; never pickles.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise bad_arg("device", device, "'cpu', 'cuda', 'cuda:N' or a torch.device") from None
    if dev.type not in ("cpu", "cuda"):
        raise bad_arg("device", device, "'cpu' or 'cuda[:N]'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise bad_arg("device", device, "'cpu' on this machine: torch sees no CUDA device")
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    raise bad_arg("dtype", dtype, "torch.float32, torch.bfloat16, torch.float16 or one of " + ", ".join(DTYPES))


def _check_fp16(dtype: torch.dtype, cfg: TransformerConfig, allow_fp16: bool) -> None:
    # CogVideoX-5B and 1.5 overflow fp16 activations and decode to black frames (their model cards
    # ask for bf16); 2B was trained in fp16.
    if dtype == torch.float16 and cfg.variant != "2b" and not allow_fp16:
        raise bad_arg("dtype", "float16", f"bfloat16 or float32 for a {cfg.variant} model: it overflows in fp16 "
                      "and produces black frames (pass allow_fp16=True to try anyway)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CVFastInputError(f"{path} is missing: a diffusers-layout CogVideoX folder has model_index.json "
                               f"and {', '.join(COMPONENTS)}/ each with its config")
    return json.loads(path.read_text())


def _load_text_encoder(folder: Path, device: torch.device, dtype: torch.dtype) -> TextEncoder:
    from transformers import AutoTokenizer, T5EncoderModel
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = T5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype, use_safetensors=True)
    return TextEncoder(tokenizer, model.to(device).eval().requires_grad_(False))


def check_parallel(parallel: par.ParallelConfig | None, cfg: TransformerConfig) -> None:
    """The model-dependent parallel checks, before the weights load."""
    if parallel is not None:
        par.check_model(parallel, cfg)


def family_defaults(cfg: TransformerConfig, spatial_factor: int) -> dict:
    defaults = dict(GENERATION_DEFAULTS["1.5" if cfg.patch_size_t is not None else "1.0"])
    if cfg.use_learned_positional_embeddings:  # only the size of its positional table works
        defaults.update(num_frames=cfg.sample_frames, height=cfg.sample_height * spatial_factor,
                        width=cfg.sample_width * spatial_factor)
    return defaults


def load_folder(folder: Path, device: torch.device, dtype: torch.dtype, ops: OpSet, allow_fp16: bool,
                offload: str = "none", name: str | None = None, parallel: par.ParallelConfig | None = None,
                transformer_weights: bool = True) -> Pipeline:
    _read_json(folder / "model_index.json")
    t_cfg = TransformerConfig.from_dict(_read_json(folder / "transformer" / "config.json"))
    _check_fp16(dtype, t_cfg, allow_fp16)
    check_parallel(parallel, t_cfg)
    v_cfg = VAEConfig.from_dict(_read_json(folder / "vae" / "config.json"))
    s_cfg = SchedulerConfig.from_dict(_read_json(folder / "scheduler" / "scheduler_config.json"))
    transformer_tensors = (lambda: transformer_state_dict(read_tensors(folder / "transformer"))) \
        if transformer_weights else None
    return assemble(t_cfg, v_cfg, s_cfg, transformer_tensors,
                    lambda: {k: (t, f"{path}:{k}") for k, (t, path) in read_tensors(folder / "vae").items()},
                    folder, device, dtype, ops, offload, name or str(folder))


def assemble(t_cfg: TransformerConfig, v_cfg: VAEConfig, s_cfg: SchedulerConfig, transformer_tensors, vae_tensors,
             text_folder: Path, device: torch.device, dtype: torch.dtype, ops: OpSet, offload: str,
             name: str) -> Pipeline:
    """A Pipeline from configs, the two components' tensors under cvfast's names (callables that
    read them, {key: (tensor, provenance)}) and a folder with text_encoder/ and tokenizer/."""
    if t_cfg.out_channels != v_cfg.latent_channels:
        raise CVFastInputError(f"{name}: transformer out_channels {t_cfg.out_channels} != VAE latent_channels "
                               f"{v_cfg.latent_channels}")
    with torch.device("meta"):
        transformer = CogVideoXTransformer(t_cfg, ops)
        vae = CogVideoXVAE(v_cfg, ops)
    # With offload="model" every component starts on the CPU and visits the device when it runs.
    home = torch.device("cpu") if offload == "model" else device
    if transformer_tensors is not None:  # None: the transformer runs elsewhere (a TensorRT engine)
        load_into(transformer, transformer_tensors(), "transformer", dtype, home)
    load_into(vae, vae_tensors(), "vae", dtype, home)
    text_encoder = _load_text_encoder(text_folder, home, dtype)
    return Pipeline(name=name, transformer=transformer.eval(), vae=vae.eval(),
                    text_encoder=text_encoder, scheduler=s_cfg, ops=ops, device=device, dtype=dtype,
                    defaults=family_defaults(t_cfg, v_cfg.spatial_factor), offload=offload)


def _download(repo_id: str, patterns: list[str] = _HUB_PATTERNS) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        raise CVFastInputError(
            f"model={repo_id!r} could not be fetched from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Download it elsewhere (e.g. `huggingface-cli download {repo_id} --local-dir DIR`) and pass the "
            "local folder instead.") from exc


def load(model: str | Path, *, device=None, dtype=None, backend: str = "auto", allow_fp16: bool = False,
         offload: str = "none", cuda_graph: bool | str = "auto", base=None, trust_pickle: bool = False,
         parallel=None, engine=None) -> Pipeline:
    """Load a CogVideoX pipeline.

    model: a diffusers-layout folder, a hub id such as "THUDM/CogVideoX-5b", or "tiny" (an embedded,
    seeded random-weight model of the real architecture; its video is noise). device: default CUDA
    when present, else CPU. dtype: default bf16 on CUDA, fp32 on CPU. backend: "auto", "reference",
    "sdpa", "triton" or "flash_attn" (see `cvfast.ops.resolve`). offload: "none", or "model" to keep
    the components on the CPU and bring each to the device only while it runs (text encoder,
    transformer, VAE). cuda_graph: generate()'s default: False, True (replay each denoising step
    from a CUDA graph captured per shape; CUDA only, without offload) or "auto" (see
    `cvfast/sampler/graph.py`). A SAT checkpoint directory (see `cvfast.sat_io`) also loads; base:
    the diffusers folder or hub id its text encoder, tokenizer and scheduler come from;
    trust_pickle=True unpickles its checkpoints without the allowlist, which runs code from the files.
    parallel: None, or e.g. "cfg=2,ulysses=2" (or a `cvfast.parallel.ParallelConfig`) in a program
    started by torchrun on cfg * ulysses ranks (see `cvfast.parallel`); a CUDA device without an
    index becomes this rank's GPU (LOCAL_RANK). Checked before the weights load.
    backend="tensorrt" with engine=PATH (from `cvfast export tensorrt`): the denoiser runs from that
    engine (CUDA; its dtype is the engine's), the rest with "auto"; the transformer's weights are not
    loaded. An engine built for another model, size or precision is refused, naming which.
    """
    config = par.parse(parallel)
    if config is not None:
        par.check_launch(config, offload, cuda_graph)
        config = config if config.world_size > 1 else None  # cfg=1,ulysses=1: a single process
    dev = resolve_device(device)
    if backend == "tensorrt" or engine is not None:
        if config is not None:
            raise bad_arg("parallel", parallel, "None with backend='tensorrt' (an engine runs on one GPU)")
        return _load_with_engine(model, engine, backend, dev, dtype, allow_fp16, offload, cuda_graph, base)
    dev = par.rank_device(dev) if config is not None else dev
    dt = resolve_dtype(dtype, dev)
    ops = resolve(backend, dev)
    if offload not in OFFLOAD_CHOICES:
        raise bad_arg("offload", offload, f"one of {OFFLOAD_CHOICES}")
    check_cuda_graph(cuda_graph, dev, offload)
    if not isinstance(model, (str, Path)):
        raise bad_arg("model", model, "a folder path, a hub id like 'THUDM/CogVideoX-5b', or 'tiny'")
    pipe = _load_model(model, dev, dt, ops, allow_fp16, offload, base, trust_pickle, config)
    pipe.cuda_graph = cuda_graph
    if config is not None:
        par.ParallelContext(config, dev).attach(pipe)
    return pipe


def _load_model(model: str | Path, dev: torch.device, dt: torch.dtype, ops: OpSet, allow_fp16: bool,
                offload: str, base, trust_pickle: bool, parallel: par.ParallelConfig | None) -> Pipeline:
    from .sat_io import is_sat_dir, load_sat
    path = Path(model).expanduser()
    if path.is_dir() and is_sat_dir(path):
        return load_sat(path, base, trust_pickle, dev, dt, ops, allow_fp16, offload, parallel)
    if base is not None:
        raise bad_arg("base", base, "None unless model is a SAT checkpoint directory (other models have their own "
                      "text encoder and scheduler)")
    if str(model) == "tiny":
        from .tiny import TRANSFORMER, build_tiny
        check_parallel(parallel, TRANSFORMER)
        return build_tiny(dev, dt, ops, offload)
    if path.is_dir():
        return load_folder(path, dev, dt, ops, allow_fp16, offload, parallel=parallel)
    parts = str(model).split("/")
    if len(parts) == 2 and all(parts) and not str(model).startswith((".", "~")):
        return load_folder(_download(str(model)), dev, dt, ops, allow_fp16, offload, name=str(model),
                           parallel=parallel)
    raise bad_arg("model", str(model), "an existing folder, a hub id 'org/name', or 'tiny'")


def _load_with_engine(model, engine, backend, dev: torch.device, dtype, allow_fp16: bool, offload: str, cuda_graph,
                      base) -> Pipeline:
    """load(backend="tensorrt", engine=PATH): every check before anything heavy."""
    from .export.tensorrt_engine import TensorRTTransformer, check_model, read_spec, require_tensorrt
    if backend != "tensorrt":
        raise bad_arg("engine", str(engine), f"None with backend={backend!r} (an engine needs backend='tensorrt')")
    if engine is None:
        raise bad_arg("engine", None, "the path of an engine from `cvfast export tensorrt` with backend='tensorrt'")
    spec = read_spec(engine)
    if dev.type != "cuda":
        raise bad_arg("device", str(dev), "a CUDA device for backend='tensorrt'")
    dt = resolve_dtype(dtype if dtype is not None else spec["dtype"], dev)
    if offload != "none":
        raise bad_arg("offload", offload, "'none' with backend='tensorrt' (the engine holds the transformer)")
    if cuda_graph is True:
        raise bad_arg("cuda_graph", cuda_graph, "False or 'auto' with backend='tensorrt' (capturing an engine's "
                      "execution is not supported yet)")
    if base is not None:
        raise bad_arg("base", base, "None with backend='tensorrt' (convert a SAT checkpoint first: cvfast convert-sat)")
    require_tensorrt()
    pipe = _load_engine_model(model, dev, dt, allow_fp16)
    check_model(spec, pipe.config, dt, engine)
    pipe.transformer = TensorRTTransformer(engine, spec, pipe.config, dev)
    pipe.cuda_graph = cuda_graph
    return pipe


def _load_engine_model(model, dev: torch.device, dt: torch.dtype, allow_fp16: bool) -> Pipeline:
    """The pipeline around an engine: VAE and text encoder loaded, the transformer's config only."""
    ops = resolve("auto", dev)
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return load_folder(path, dev, dt, ops, allow_fp16, transformer_weights=False)
    parts = str(model).split("/")
    if len(parts) == 2 and all(parts) and not str(model).startswith((".", "~")):
        return load_folder(_download(str(model)), dev, dt, ops, allow_fp16, name=str(model), transformer_weights=False)
    raise bad_arg("model", str(model), "a diffusers-layout folder or hub id with backend='tensorrt' (the engine "
                  "replaces its transformer)")
