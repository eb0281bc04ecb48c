"""Export the CogVideoX transformer (the denoiser) to ONNX, for TensorRT and Triton serving.

`export_onnx(pipe, out_dir, frames=, height=, width=)` writes `out_dir/transformer.onnx` for one
video size (in pixels, as `Pipeline.generate` takes it), with a dynamic batch dimension:

    inputs   hidden_states          (batch, latent_frames, in_channels, latent_h, latent_w)  model dtype
             encoder_hidden_states  (batch, text_len, text_dim)                               model dtype
             timestep               (batch,)                                                  float32
             ofs                    (batch,)  only for models with an ofs embedding (1.5-I2V) float32
    output   noise_pred             (batch, latent_frames, out_channels, latent_h, latent_w)  model dtype

`latent_frames` includes CogVideoX 1.5's temporal-patch padding (9 frames -> 3 latent frames -> 4),
exactly as `Pipeline` builds its latents; for image-to-video models `in_channels` is twice the
latent channels (the noisy latents and the image latents, concatenated on channels). `text_len` is
the model's `max_text_seq_length` (226) unless `text_len=` says otherwise.

`timestep` is float32, not int64: the model only uses it as `float(t)` in its sinusoidal features,
float32 holds every integer timestep up to 2^24 exactly (so feeding the sampler's int64 timesteps
cast to float32 gives the same result), a fractional timestep also works, and a float input avoids
TensorRT's restrictions on INT64 tensors. `ofs` is float32 for the same reasons (the pipeline
passes 2.0).

The positional inputs (3D sincos table for 2B, RoPE cos/sin for 5B/1.5) are computed once for the
exported size by `CogVideoXTransformer.position_tables` and baked into the graph as constants
(buffers of the wrapper module), which is why an exported file is for one size.

Exporter and opset (pinned): `torch.onnx.export(..., dynamo=True)` -- torch.export (non-strict)
plus the onnxscript translator, the default and maintained exporter of torch >= 2.9 -- at ai.onnx
opset 18. The dynamo exporter handles the dynamic batch of this model (a `torch.export.Dim` named
"batch"; the graph is traced at batch 2 because torch.export specialises a size-1 example to a
constant), so the deprecated TorchScript exporter (dynamo=False) is not used. Opset 18 is the
native opset of the exporter's op library (torchlib), so no version conversion pass runs; it has
LayerNormalization (17) and keeps GELU(tanh) as elementary ops (the Gelu op arrives in 20); and it
is inside what TensorRT 10.x's ONNX parser takes (10.0: opsets 9-20; 10.15: 9-24) and what
onnxruntime runs.

The export runs the model with cvfast's reference ops and PyTorch SDPA for attention, whatever
backend `pipe` was loaded with: no custom kernel needs an ONNX lowering, and attention is written
as one matmul-softmax-matmul per layer (the pattern TensorRT fuses into its attention kernels)
rather than the reference's loop over 1,024-query blocks.

Weights above `external_data_threshold_bytes` (default 2 GB, below protobuf's 2 GiB limit on one
message) go to ONE external-data file beside the model, `transformer.onnx.data`.

After writing, the file is re-read and its inputs/outputs are checked: names, element types, and a
symbolic (named, not fixed) batch dimension; `ONNXExportError` otherwise.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..core.checks import check_fp16, positive_int, resolve_dtype
from ..core.errors import ONNXExportError, bad_arg
from ..core.files import check_writable, replacing
from ..models.geometry import check_size, latent_shape
from ..models.transformer import CogVideoXTransformer
from ..ops import resolve
from ..runtime.tensorrt import INPUT_NAMES, OFS_INPUT, OUTPUT_NAME

EXPORTER = "torch.onnx.export(dynamo=True)"
OPSET = 18
MODEL_FILE = "transformer.onnx"
DATA_FILE = MODEL_FILE + ".data"  # the weights, beside the model when they exceed the threshold
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes of weights; protobuf caps one message at 2 GiB
BATCH_DIM = "batch"
MAX_BATCH = 4096


def require_onnx() -> None:
    """Raise a clear error when the optional ONNX packages are missing."""
    missing = []
    for mod in ("onnx", "onnxscript", "onnx_ir", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'cvfast[onnx]' "
                          "(onnx, onnxscript, onnx-ir, onnxruntime)")


class TransformerForExport(nn.Module):
    """The cvfast transformer with its positional tables baked in: forward(hidden_states,
    encoder_hidden_states, timestep) -> noise_pred. The tables are buffers, so the exporter writes
    them as constants of the graph: RoPE cos/sin in float32 (RoPE runs in fp32), the sincos table in
    the model's dtype (the forward casts it to that dtype before adding it)."""

    def __init__(self, transformer: nn.Module, tables: dict):
        super().__init__()
        self.transformer = transformer
        self.table_kind = next(iter(tables)) if tables else None
        if self.table_kind == "rope":
            self.register_buffer("rope_cos", tables["rope"][0].float().contiguous())
            self.register_buffer("rope_sin", tables["rope"][1].float().contiguous())
        elif self.table_kind == "sincos":  # the forward casts it to the model's dtype: store it cast
            dtype = next(transformer.parameters()).dtype
            self.register_buffer("sincos", tables["sincos"].to(dtype).contiguous())

    def _tables(self) -> dict:
        if self.table_kind == "rope":
            return {"rope": (self.rope_cos, self.rope_sin)}
        if self.table_kind == "sincos":
            return {"sincos": self.sincos}
        return {}

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        return self.transformer(hidden_states, encoder_hidden_states, timestep, self._tables())


class TransformerForExportOfs(TransformerForExport):
    """Same, with the ofs input of CogVideoX 1.5-I2V."""

    def forward(self, hidden_states, encoder_hidden_states, timestep, ofs):
        return self.transformer(hidden_states, encoder_hidden_states, timestep, self._tables(), ofs)


def reference_transformer(pipe, dtype: torch.dtype) -> nn.Module:
    """A transformer with the reference ops (SDPA attention) on the CPU in `dtype`, sharing `pipe`'s weight tensors
    when they already are CPU tensors of that dtype (no copy), else converted copies."""
    src = pipe.transformer
    with torch.device("meta"):
        tr = CogVideoXTransformer(src.cfg, resolve("sdpa", "cpu"))
    state = {k: v.detach().to(device="cpu", dtype=dtype) for k, v in src.state_dict().items()}
    tr.load_state_dict(state, strict=True, assign=True)
    return tr.eval().requires_grad_(False)


def export_shapes(pipe, frames: int, height: int, width: int, text_len: int | None = None) -> dict:
    """The exported input shapes (without the batch) for a size in pixels."""
    cfg = pipe.config
    latent_frames, _, lh, lw = latent_shape(cfg, pipe.vae.config, frames, height, width)
    return {"hidden_states": (latent_frames, cfg.in_channels, lh, lw),
            "encoder_hidden_states": (text_len or cfg.max_text_seq_length, cfg.text_embed_dim),
            "timestep": (), OFS_INPUT: (),
            OUTPUT_NAME: (latent_frames, cfg.out_channels, lh, lw)}


def build_export_module(pipe, latent: tuple[int, int, int], dtype: torch.dtype) -> TransformerForExport:
    """The wrapper module (reference ops with SDPA attention, CPU, `dtype`) for latent (frames, height, width)."""
    transformer = reference_transformer(pipe, dtype)
    latent_frames, lh, lw = latent
    tables = transformer.position_tables(latent_frames, lh, lw, "cpu")
    cls = TransformerForExportOfs if pipe.config.ofs_embed_dim else TransformerForExport
    return cls(transformer, tables).eval()


def example_inputs(pipe, shapes: dict, batch: int, dtype: torch.dtype, generator: torch.Generator) -> dict:
    """Random inputs of the exported signature: latents and text N(0, 1), integer-valued timesteps
    in [0, 1000), ofs in [0, 4)."""
    inputs = {
        "hidden_states": torch.randn((batch, *shapes["hidden_states"]), generator=generator).to(dtype),
        "encoder_hidden_states": torch.randn((batch, *shapes["encoder_hidden_states"]), generator=generator).to(dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator).float(),
    }
    if pipe.config.ofs_embed_dim:
        inputs[OFS_INPUT] = torch.rand((batch,), generator=generator) * 4
    return inputs


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter warns about absent torchvision ops and deprecated pytree APIs; none of it
    concerns this model."""
    names = ("torch.onnx._internal.exporter._registration", "torch.onnx")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_arguments(pipe, frames, height, width, batch, dtype, text_len, allow_untrained_size):
    """export_onnx's arguments, checked with generate()'s rules and named as the export names them."""
    frames = positive_int("frames", frames)
    height = positive_int("height", height)
    width = positive_int("width", width)
    batch = positive_int("batch", batch)
    if batch > MAX_BATCH:
        raise bad_arg("batch", batch, f"at most {MAX_BATCH}")
    cfg = pipe.config
    check_size(cfg, pipe.vae.config, frames, height, width, image_to_video=cfg.is_image_to_video,
               allow_untrained_size=allow_untrained_size, frames_name="frames")
    dt = pipe.dtype if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
    check_fp16(dt, cfg.variant, allow_fp16=pipe.dtype == torch.float16)
    text_len = cfg.max_text_seq_length if text_len is None else positive_int("text_len", text_len)
    if cfg.use_learned_positional_embeddings and text_len != cfg.max_text_seq_length:
        raise bad_arg("text_len", text_len, f"{cfg.max_text_seq_length} for this model (its learned positional "
                      "table includes the text tokens)")
    return frames, height, width, batch, dt, text_len


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def export_onnx(pipe, out_dir, *, frames: int, height: int, width: int, batch: int = 1, dtype=None,
                text_len: int | None = None, allow_untrained_size: bool = False,
                external_data_threshold_bytes: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> Path:
    """Export `pipe`'s transformer to `out_dir/transformer.onnx` for frames x height x width pixels.

    frames, height, width: the video size as `Pipeline.generate` takes it, checked with the same
    rules (`CVFastInputError` naming the argument). batch: the batch the engine is tuned for
    (recorded in the model's metadata; the graph's batch dimension is dynamic either way). dtype:
    the weights' and activations' dtype, default the pipeline's. text_len: default the model's
    max_text_seq_length. allow_untrained_size: as in generate() (1.5-I2V's size rules).
    external_data_threshold_bytes: weights larger than this go to `transformer.onnx.data`.
    Returns the path of the .onnx file.
    """
    if pipe.parallel is not None:
        raise bad_arg("pipe", pipe.name, "a pipeline loaded without parallel=...: the export traces one process's "
                      "whole transformer, not a rank's share of it")
    if pipe.runtime.precision != "bf16":
        raise bad_arg("pipe", pipe.name, f"a pipeline loaded with precision='bf16', not {pipe.runtime.precision!r}: "
                      "the ONNX graph and TensorRT engines carry unquantized weights")
    frames, height, width, batch, dt, text_len = check_arguments(pipe, frames, height, width, batch, dtype, text_len,
                                                             allow_untrained_size)
    if isinstance(external_data_threshold_bytes, bool) or not isinstance(external_data_threshold_bytes, int) \
            or external_data_threshold_bytes < 0:
        raise bad_arg("external_data_threshold_bytes", external_data_threshold_bytes, "an integer >= 0")
    require_onnx()
    import onnx_ir as ir
    out_dir = check_export_dir(out_dir)

    shapes = export_shapes(pipe, frames, height, width, text_len)
    latent_frames, _, lh, lw = shapes["hidden_states"]
    module = build_export_module(pipe, (latent_frames, lh, lw), dt)
    has_ofs = bool(pipe.config.ofs_embed_dim)
    # torch.export turns a size-1 example dimension into the constant 1: trace at batch >= 2.
    example = example_inputs(pipe, shapes, max(batch, 2), dt, torch.Generator().manual_seed(0))
    names = list(example)
    dim = torch.export.Dim(BATCH_DIM, min=1, max=MAX_BATCH)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(module, tuple(example.values()), dynamo=True, opset_version=OPSET,
                                    input_names=names, output_names=[OUTPUT_NAME],
                                    dynamic_shapes={n: {0: dim} for n in names}, optimize=True, verbose=False)
    cfg = pipe.config
    program.model.metadata_props.update({
        "cvfast.exporter": EXPORTER, "cvfast.opset": str(OPSET), "cvfast.variant": cfg.variant,
        "cvfast.frames": str(frames), "cvfast.height": str(height), "cvfast.width": str(width),
        "cvfast.batch": str(batch), "cvfast.dtype": str(dt).replace("torch.", ""),
        "cvfast.text_len": str(text_len), "cvfast.model": str(pipe.name),
        "cvfast.timestep": "float32 (batch,): the sampler's integer timesteps as float",
    })
    external = weight_bytes(module) > external_data_threshold_bytes
    # Written and checked in a new directory beside out_dir, which then replaces it as a whole: a
    # failure or a kill leaves the previous export (model and data file) as it was.
    with replacing(out_dir, directory=True) as staging:
        path = staging / MODEL_FILE
        ir.save(program.model, path, **({"external_data": DATA_FILE} if external else {}))
        verify_signature(path, [*INPUT_NAMES, *([OFS_INPUT] if has_ofs else [])], shapes, dt)
    return out_dir / MODEL_FILE


def check_export_dir(out_dir) -> Path:
    """out_dir, once it is known the export can replace it (its parents are created): a new
    directory, or one that holds only a previous export (replacing it would delete anything else)."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.is_dir():
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in (MODEL_FILE, DATA_FILE) or p.is_dir())
        if other:
            raise bad_arg("out_dir", str(out_dir), f"a new directory or a previous export's: the export replaces "
                          f"it as a whole, and it holds {other[:5]}")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise bad_arg("out_dir", str(out_dir), f"a path whose parent can be created ({exc.strerror})") from None
    return check_writable(out_dir, "out_dir", directory=True)


_ONNX_DTYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}  # onnx.TensorProto enums


def io_dims(value_info) -> list:
    """A graph input's/output's dims: int for a fixed one, the name (str) for a symbolic one, None
    when unknown."""
    out = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def verify_signature(path: Path, input_names: list[str], shapes: dict, dtype: torch.dtype) -> None:
    """Re-read the written model: exactly the expected inputs and output, each with a symbolic batch
    dimension first and the exported fixed dims after it, in the expected element types."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    got_in, got_out = [i.name for i in graph.input], [o.name for o in graph.output]
    if got_in != input_names or got_out != [OUTPUT_NAME]:
        raise ONNXExportError(f"{path}: inputs {got_in} and outputs {got_out}, expected {input_names} and "
                              f"{[OUTPUT_NAME]}")
    float_type = _ONNX_DTYPES[dtype]
    for vi in [*graph.input, *graph.output]:
        dims = io_dims(vi)
        if not dims or not isinstance(dims[0], str):
            raise ONNXExportError(f"{path}: {vi.name} has batch dimension {dims[:1]}, expected a symbolic "
                                  f"dimension ({BATCH_DIM!r}): the exporter fixed the batch size")
        if tuple(dims[1:]) != tuple(shapes[vi.name]):
            raise ONNXExportError(f"{path}: {vi.name} has dims {dims}, expected [{BATCH_DIM}, "
                                  f"{', '.join(map(str, shapes[vi.name]))}]")
        want = 1 if vi.name in ("timestep", OFS_INPUT) else float_type
        if vi.type.tensor_type.elem_type != want:
            raise ONNXExportError(f"{path}: {vi.name} has element type {vi.type.tensor_type.elem_type}, "
                                  f"expected {want}")
