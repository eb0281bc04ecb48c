"""An NVIDIA Triton Inference Server model repository for the exported transformer.

`write_serving_repo(onnx_path, repo_dir)` writes

    repo_dir/<name>/config.pbtxt     platform "tensorrt_plan", max_batch_size 0, inputs/outputs
                                     with the ONNX model's names, element types and dims (the
                                     dynamic batch as -1)
    repo_dir/<name>/1/README.txt     how to build the engine that goes there as <engine_file>

The engine itself is not built here (that needs TensorRT on the GPU it will run on); the README
gives the trtexec command, with the shape profile taken from the ONNX model.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..core.errors import bad_arg
from ..core.files import write_text
from .onnx import require_onnx

# onnx.TensorProto element type -> Triton data_type.
TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
                12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _io(value_infos) -> list[dict]:
    out = []
    for vi in value_infos:
        tt = vi.type.tensor_type
        if tt.elem_type not in TRITON_TYPES:
            raise ValueError(f"{vi.name}: ONNX element type {tt.elem_type} has no Triton data type")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        out.append({"name": vi.name, "data_type": TRITON_TYPES[tt.elem_type], "dims": dims,
                    "symbolic": [d.dim_param if not d.HasField("dim_value") else None for d in tt.shape.dim]})
    return out


def _block(kind: str, tensors: list[dict]) -> str:
    items = []
    for t in tensors:
        items.append("  {\n"
                     f"    name: \"{t['name']}\"\n"
                     f"    data_type: {t['data_type']}\n"
                     f"    dims: [ {', '.join(str(d) for d in t['dims'])} ]\n"
                     "  }")
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _shape_arg(tensors: list[dict], batch: int) -> str:
    return ",".join(f"{t['name']}:" + "x".join(str(batch if d == -1 else d) for d in t["dims"]) for t in tensors)


def write_serving_repo(onnx_path, repo_dir, *, name: str = "cogvideox_transformer",
                       engine_file: str = "model.plan") -> Path:
    """Write a Triton model repository for `onnx_path`'s TensorRT engine; returns `repo_dir/name`."""
    require_onnx()
    import onnx
    path = Path(onnx_path)
    if not path.is_file():
        raise bad_arg("onnx_path", str(onnx_path), "an existing .onnx file (from cvfast.export_onnx)")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_arg("name", name, "a model name of letters, digits, '_', '-' and '.'")
    if not isinstance(engine_file, str) or not _NAME.match(engine_file):
        raise bad_arg("engine_file", engine_file, "a file name of letters, digits, '_', '-' and '.'")
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    inputs, outputs = _io(model.graph.input), _io(model.graph.output)

    model_dir = Path(repo_dir) / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    header = [f"# Triton model configuration for {path.name}"
              + (f" ({meta['cvfast.variant']}, {meta.get('cvfast.frames')}x{meta.get('cvfast.height')}x"
                 f"{meta.get('cvfast.width')}, {meta.get('cvfast.dtype')})" if "cvfast.variant" in meta else ""),
              "# written by cvfast.export.write_serving_repo; dims are the ONNX model's, -1 = dynamic (batch)"]
    config = "\n".join(header) + "\n" + f"name: \"{name}\"\nplatform: \"tensorrt_plan\"\nmax_batch_size: 0\n"
    if engine_file != "model.plan":
        config += f"default_model_filename: \"{engine_file}\"\n"
    config += _block("input", inputs) + _block("output", outputs)
    config += "instance_group [\n  {\n    count: 1\n    kind: KIND_GPU\n  }\n]\n"
    write_text(model_dir / "config.pbtxt", config)

    # A shape profile for the engine: batch 1 up to twice the exported batch (classifier-free
    # guidance runs the negative and the positive prompt in one batch).
    batch = int(meta.get("cvfast.batch", "1"))
    dtype = meta.get("cvfast.dtype", "float32")
    precision = {"bfloat16": " --bf16", "float16": " --fp16"}.get(dtype, "")
    engine = (version_dir / engine_file).resolve()
    readme = (
        f"The TensorRT engine of this model goes here as {engine_file}; cvfast does not build it on a machine\n"
        "without TensorRT. On the GPU that will serve it (same GPU model, TensorRT version as Triton's),\n"
        "build it from the ONNX export with trtexec (ships with TensorRT; `pip install tensorrt` on a CUDA\n"
        "machine gives the Python API):\n\n"
        f"  trtexec --onnx={path.resolve()} \\\n"
        f"          --saveEngine={engine} \\\n"
        f"          --minShapes={_shape_arg(inputs, 1)} \\\n"
        f"          --optShapes={_shape_arg(inputs, 2 * batch)} \\\n"
        f"          --maxShapes={_shape_arg(inputs, 2 * batch)}{precision}\n\n"
        "(`cvfast export tensorrt` will do this once the TensorRT part of the export lands.) The profile\n"
        f"covers batch 1 to {2 * batch}, twice the exported batch {batch}: classifier-free guidance runs the\n"
        "negative and positive prompts in one batch. The other dims are fixed by the export (one video size\n"
        "per engine); Triton serves the engine with the config.pbtxt one directory up.\n"
    )
    write_text(version_dir / "README.txt", readme)
    return model_dir
