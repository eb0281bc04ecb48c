"""Checks of an exported transformer: numerics under onnxruntime, and TensorRT operator coverage.

`check_onnx(pipe, onnx_path)` runs the ONNX model under onnxruntime on fresh random inputs at each
batch size (from the same file: the batch dimension is dynamic) and compares it with cvfast's
reference forward (plain-PyTorch ops on the CPU) of the same weights at the same size: relative L2
error ||onnx - ref|| / ||ref||, max abs error and cosine similarity, in float64. It raises
`ONNXCheckError` when the relative L2 error exceeds the bound of the precision that ran:

    float32   1e-4   both sides compute the same ops in fp32; what differs is summation order and
                     kernel choice (onnxruntime's GEMM/softmax vs PyTorch's), ~1e-6 measured on the
                     tiny models. 1e-4 is the bar of the export issue.
    float16   5e-3   ~10 units of fp16's roundoff (2^-11 = 4.9e-4): the two runtimes round
                     intermediate results at different places (fused vs separate ops, accumulation
                     precision of GEMMs), and those differences add up over the layers.
    bfloat16  2e-2   the same reasoning with bf16's 8-bit mantissa (roundoff 2^-9 = 2e-3): two
                     correct bf16 implementations of one model commonly differ by 0.5-1 % relative
                     L2; 2e-2 still catches a wrong graph (those give errors of order 1).

onnxruntime's CPU provider has no bf16 (and few fp16) kernels for Gemm/MatMul. When the model
cannot run natively in its dtype on the providers present, the check runs the *same graph* with
every bf16/fp16 initializer, constant, cast and input/output promoted to fp32 (exact for the
values: both types embed in fp32; the graph then computes in fp32 without rounding in between),
against the reference forward in the model's dtype, with that dtype's bound. That still verifies
the graph's structure and weights (a wrong graph gives errors of order 1), not the low-precision
numerics of a runtime; those are checked where a bf16-capable provider (CUDA) is present. (A
comparison of the promoted graph with an fp32 reference is not exact either: the exporter folds
some constants, e.g. GELU's tanh coefficients, into the graph in bf16.) The result says which mode
ran (`mode`: "native" or "fp32-emulation").

`unsupported_ops(onnx_path)` lists the op types of the graph (local functions inlined, subgraphs
included) that TensorRT's ONNX parser does not support, per `tensorrt_onnx_ops.json`.
"""
from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ONNXCheckError, bad_arg
from ..runtime.tensorrt import OFS_INPUT, OUTPUT_NAME
from .onnx import build_export_module, example_inputs, io_dims, require_onnx

REL_L2_BOUNDS = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
TENSORRT_OPS_FILE = Path(__file__).with_name("tensorrt_onnx_ops.json")
_ONNX_TO_TORCH = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16}
_LOW_PRECISION = (10, 16)  # TensorProto.FLOAT16, BFLOAT16
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _stats(out: np.ndarray, ref: np.ndarray) -> dict:
    out, ref = out.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    diff = out - ref
    ref_norm = float(np.linalg.norm(ref))
    return {"rel_l2": float(np.linalg.norm(diff)) / max(ref_norm, 1e-30),
            "max_abs": float(np.abs(diff).max()),
            "cosine": float(out @ ref / max(float(np.linalg.norm(out)) * ref_norm, 1e-30)),
            "finite": bool(np.isfinite(out).all())}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def _subgraphs(node):
    """The graphs held in `node`'s attributes (If branches, Loop/Scan bodies)."""
    import onnx
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def promote_to_fp32(model) -> None:
    """In place: every bf16/fp16 tensor type, initializer, constant and cast of `model` -> fp32."""
    import onnx
    from onnx import numpy_helper

    def fix_tensor(t):
        if t.data_type in _LOW_PRECISION:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    def fix_graph(g):
        for t in g.initializer:
            fix_tensor(t)
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.tensor_type.elem_type in _LOW_PRECISION:
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    fix_tensor(attr.t)
                elif attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i in _LOW_PRECISION:
                    attr.i = onnx.TensorProto.FLOAT
            for sub in _subgraphs(node):
                fix_graph(sub)

    fix_graph(model.graph)


def _session(path: Path, providers: list[str]):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers)


def check_onnx(pipe, onnx_path, *, batch_sizes=(1, 2), seed: int = 0, providers: list[str] | None = None) -> dict:
    """Run `onnx_path` under onnxruntime at each batch size and compare with the reference forward.

    Returns {"dtype", "mode", "bound", "providers", "batches": {b: {"rel_l2", "max_abs", "cosine",
    "finite"}}, "max_rel_l2", "unsupported_ops"}; raises ONNXCheckError when a batch's relative L2
    error exceeds the bound (see the module docstring) or its output is not finite.
    providers: onnxruntime execution providers, default CUDA when available, then CPU.
    """
    require_onnx()
    import onnx
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise bad_arg("onnx_path", str(onnx_path), "an existing .onnx file (from cvfast.export_onnx)")
    if isinstance(batch_sizes, int) or not batch_sizes or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise bad_arg("batch_sizes", batch_sizes, "a non-empty sequence of integers >= 1")
    header = onnx.load(str(path), load_external_data=False)
    inputs = {vi.name: vi for vi in header.graph.input}
    hs = inputs.get("hidden_states")
    if hs is None or len(io_dims(hs)) != 5:
        raise bad_arg("onnx_path", str(onnx_path), "a transformer exported by cvfast.export_onnx (no 5-D "
                      "hidden_states input)")
    _, latent_frames, in_channels, lh, lw = io_dims(hs)
    text_len = io_dims(inputs["encoder_hidden_states"])[1]
    dtype = _ONNX_TO_TORCH[hs.type.tensor_type.elem_type]
    cfg = pipe.config
    if in_channels != cfg.in_channels or (OFS_INPUT in inputs) != bool(cfg.ofs_embed_dim):
        raise bad_arg("onnx_path", str(onnx_path), f"a model exported from this {cfg.variant} pipeline "
                      f"(in_channels {cfg.in_channels}, ofs input {bool(cfg.ofs_embed_dim)})")

    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    mode, run_path, tmp = "native", path, None
    try:
        try:
            session = _session(path, providers)
        except Exception as exc:  # onnxruntime: NOT_IMPLEMENTED for a bf16/fp16 kernel
            if dtype == torch.float32:
                raise
            mode = "fp32-emulation"
            model = onnx.load(str(path))
            promote_to_fp32(model)
            tmp = tempfile.TemporaryDirectory(prefix="cvfast-check-")
            run_path = Path(tmp.name) / "fp32.onnx"
            onnx.save_model(model, str(run_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="fp32.onnx.data")
            del model
            session = _session(run_path, providers)
            emulation_reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        bound = REL_L2_BOUNDS[dtype]
        module = build_export_module(pipe, (latent_frames, lh, lw), dtype)
        shapes = {"hidden_states": (latent_frames, in_channels, lh, lw),
                  "encoder_hidden_states": (text_len, cfg.text_embed_dim)}
        result = {"onnx_path": str(path), "dtype": str(dtype).replace("torch.", ""), "mode": mode,
                  "bound": bound, "providers": session.get_providers(), "batches": {}}
        if mode != "native":
            result["emulation_reason"] = emulation_reason
        for batch in batch_sizes:
            feed = example_inputs(pipe, shapes, batch, dtype, torch.Generator().manual_seed(seed * 1000 + batch))
            with torch.no_grad():
                ref = module(*feed.values()).float().numpy()
            if mode != "native":  # the promoted graph takes fp32 (the same, exactly representable values)
                feed = {k: v.float() for k, v in feed.items()}
            out = session.run([OUTPUT_NAME], {k: _to_numpy(v) for k, v in feed.items()})[0]
            if out.shape != ref.shape:
                raise ONNXCheckError(f"{path} at batch {batch}: output shape {out.shape}, reference {ref.shape}")
            result["batches"][batch] = _stats(np.asarray(out, dtype=np.float32), ref)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["max_rel_l2"] = max(s["rel_l2"] for s in result["batches"].values())
    result["unsupported_ops"] = unsupported_ops(path)
    for batch, stats in result["batches"].items():
        if not stats["finite"] or not stats["rel_l2"] <= bound:
            raise ONNXCheckError(f"{path} ({result['dtype']}, {mode}) at batch {batch}: relative L2 error "
                                 f"{stats['rel_l2']:.3g} > bound {bound:g} (max abs {stats['max_abs']:.3g}, "
                                 f"cosine {stats['cosine']:.6f}, finite {stats['finite']})")
    return result


@lru_cache(maxsize=1)
def tensorrt_ops() -> dict:
    """The contents of tensorrt_onnx_ops.json: version, source, supported and unsupported op types."""
    return json.loads(TENSORRT_OPS_FILE.read_text())


def graph_op_types(model) -> set[tuple[str, str]]:
    """(domain, op_type) of every node of `model` after inlining its local functions, including the
    nodes of subgraphs (If/Loop/Scan bodies)."""
    from onnx import inliner
    if model.functions:
        model = inliner.inline_local_functions(model)
    found: set[tuple[str, str]] = set()

    def walk(graph):
        for node in graph.node:
            found.add((node.domain, node.op_type))
            for sub in _subgraphs(node):
                walk(sub)

    walk(model.graph)
    for fn in model.functions:  # functions the inliner left (not called, or recursive): list theirs too
        for node in fn.node:
            found.add((node.domain, node.op_type))
    return found


def unsupported_ops(onnx_path) -> list[str]:
    """Op types of the model that TensorRT's ONNX parser does not support (per
    tensorrt_onnx_ops.json), sorted; ops of a non-standard domain are named 'domain::Op'. Weights
    are not read."""
    require_onnx()
    import onnx
    path = Path(onnx_path)
    if not path.is_file():
        raise bad_arg("onnx_path", str(onnx_path), "an existing .onnx file")
    model = onnx.load(str(path), load_external_data=False)
    supported = set(tensorrt_ops()["supported"])
    out = set()
    for domain, op in graph_op_types(model):
        if domain in _DEFAULT_DOMAINS:
            if op not in supported:
                out.add(op)
        else:
            out.add(f"{domain}::{op}")
    return sorted(out)
