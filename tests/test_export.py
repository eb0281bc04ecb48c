"""Export for serving: ONNX export of the transformer (dynamic batch), its onnxruntime check against
the reference forward, the TensorRT operator check, the Triton repository, and the CLI.

Each variant is exported once per session (module fixtures: an export takes ~9 s on 2 CPU cores);
2B goes through the CLI subprocess, the others through the API.
"""
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cvfast
from cvfast import CVFastInputError
from cvfast.models.geometry import latent_shape
from tests.numerics import rel_l2
from tests.extras import require

FRAMES, HEIGHT, WIDTH = 9, 64, 96          # latent 3 x 8 x 12 (1.5: 3 latent frames padded to 4)


def _onnx_stack():
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        require(mod)


def _pipe(variant):
    require("diffusers")  # the tiny folders are written with diffusers
    from tests.fixtures import tiny_folder
    return cvfast.load(tiny_folder(variant), device="cpu", dtype=torch.float32, backend="reference")


_exports: dict = {}


def _export(variant, tmp_path_factory, **kw):
    """(pipe, onnx path), once per variant per session."""
    _onnx_stack()
    if variant not in _exports:
        pipe = _pipe(variant)
        out = tmp_path_factory.mktemp(f"onnx-{variant}")
        path = cvfast.export_onnx(pipe, out, frames=FRAMES, height=HEIGHT, width=WIDTH,
                                  allow_untrained_size=True, **kw)
        _exports[variant] = pipe, path
    return _exports[variant]


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """`python -m cvfast export onnx --check --serving-repo` on the 2B tiny model, started in the
    background when the module's first export test starts, so that it runs on the second core while
    the other variants export in this process; `wait()` returns the finished process."""
    _onnx_stack()
    pipe = _pipe("2b")
    from tests.fixtures import tiny_folder
    out, repo = tmp_path_factory.mktemp("cli-onnx"), tmp_path_factory.mktemp("cli-repo")
    proc = subprocess.Popen([sys.executable, "-m", "cvfast", "export", "onnx", "--model", str(tiny_folder("2b")),
                             "--out", str(out), "--frames", str(FRAMES), "--height", str(HEIGHT), "--width",
                             str(WIDTH), "--batch", "2", "--check", "--serving-repo", str(repo)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = {}

    def wait():
        if not done:
            stdout, stderr = proc.communicate(timeout=600)
            done.update(returncode=proc.returncode, stdout=stdout, stderr=stderr)
        return SimpleNamespace(**done)

    yield wait, pipe, out / "transformer.onnx", repo
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cli_export):
    def get(variant):
        if variant == "2b":
            wait, pipe, path, _ = cli_export
            finished = wait()
            assert finished.returncode == 0, finished.stderr
            return pipe, path
        # 1.5-I2V is written with its weights in external data (threshold 0): the switch is exercised
        # and onnxruntime must load the .data file.
        kw = {"external_data_threshold_bytes": 0} if variant == "1.5-i2v" else {}
        return _export(variant, tmp_path_factory, **kw)
    return get


# 2B last: its export runs in the CLI subprocess meanwhile (see cli_export).
@pytest.mark.parametrize("variant", ["5b", "1.5", "1.5-i2v", "2b"])
def test_export_matches_reference_at_batch_1_and_2(exported, variant):
    import onnx
    import onnxruntime as ort

    from cvfast.export import check_onnx, unsupported_ops
    pipe, path = exported(variant)
    cfg = pipe.config
    # The signature: names, symbolic batch, latent shape as the pipeline builds it (1.5 pads 3 -> 4).
    model = onnx.load(str(path), load_external_data=False)
    latent_frames, _, lh, lw = latent_shape(pipe.config, pipe.vae.config, FRAMES, HEIGHT, WIDTH)
    assert latent_frames == (4 if cfg.patch_size_t else 3)
    names = ["hidden_states", "encoder_hidden_states", "timestep"] + (["ofs"] if cfg.ofs_embed_dim else [])
    assert [i.name for i in model.graph.input] == names
    assert [o.name for o in model.graph.output] == ["noise_pred"]
    dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in [*model.graph.input, *model.graph.output]}
    assert dims["hidden_states"] == ["batch", latent_frames, cfg.in_channels, lh, lw]
    assert dims["noise_pred"] == ["batch", latent_frames, cfg.out_channels, lh, lw]
    assert dims["encoder_hidden_states"] == ["batch", cfg.max_text_seq_length, cfg.text_embed_dim]
    assert dims["timestep"] == ["batch"]
    assert {o.domain: o.version for o in model.opset_import}[""] == 18

    # check_onnx: batch 1 and 2 from the same file, against the reference forward.
    result = check_onnx(pipe, path, batch_sizes=(1, 2))
    assert result["mode"] == "native" and result["dtype"] == "float32" and result["bound"] == 1e-4
    assert set(result["batches"]) == {1, 2}
    for stats in result["batches"].values():
        assert stats["rel_l2"] < 1e-4 and stats["cosine"] > 0.999999 and stats["finite"]
    assert result["unsupported_ops"] == [] and unsupported_ops(path) == []

    # Independently of the export wrapper: the pipeline's own transformer with tables computed the
    # way Pipeline.denoise computes them, batch 3 with distinct timesteps.
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(3, latent_frames, cfg.in_channels, lh, lw, generator=g)
    text = torch.randn(3, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    t = torch.tensor([999.0, 500.0, 3.0])
    feed = {"hidden_states": latents, "encoder_hidden_states": text, "timestep": t}
    ofs = None
    if cfg.ofs_embed_dim:
        ofs = feed["ofs"] = torch.tensor([2.0, 2.0, 0.5])
    tables = pipe.transformer.position_tables(latent_frames, lh, lw, "cpu")
    with torch.no_grad():
        ref = pipe.transformer(latents, text, t.long(), tables, ofs=ofs).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(["noise_pred"], {k: v.numpy() for k, v in feed.items()})[0]
    assert out.shape == ref.shape and rel_l2(out, ref) < 1e-4


def test_external_data_switch(exported):
    _, small = exported("5b")
    assert sorted(p.name for p in small.parent.iterdir()) == ["transformer.onnx"]
    pipe, big = exported("1.5-i2v")  # exported with external_data_threshold_bytes=0
    assert sorted(p.name for p in big.parent.iterdir()) == ["transformer.onnx", "transformer.onnx.data"]
    import onnx
    model = onnx.load(str(big), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    assert locations == {"transformer.onnx.data"}  # one file, beside the model
    # Every weight matrix is outside (the writer keeps only tensors of <= 256 bytes inline).
    assert all(len(t.raw_data) <= 256 for t in model.graph.initializer if t not in external)
    weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    assert big.with_name("transformer.onnx.data").stat().st_size >= 0.9 * weights


def test_serving_repo_config_matches_onnx(exported, tmp_path):
    import onnx

    from cvfast.export import write_serving_repo
    _, path = exported("1.5-i2v")
    model_dir = write_serving_repo(path, tmp_path / "repo", name="cvx", engine_file="engine.plan")
    assert model_dir == tmp_path / "repo" / "cvx"
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["README.txt"]
    readme = (model_dir / "1" / "README.txt").read_text()
    assert "trtexec" in readme and "engine.plan" in readme and "hidden_states:1x4x8x8x12" in readme
    config = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "max_batch_size: 0" in config
    assert 'name: "cvx"' in config and 'default_model_filename: "engine.plan"' in config
    blocks = {kind: re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[([^\]]*)\]', body)
              for kind, body in re.findall(r"^(input|output) \[(.*?)^\]", config, re.S | re.M)}
    types = {1: "TYPE_FP32", 7: "TYPE_INT64", 16: "TYPE_BF16", 10: "TYPE_FP16"}
    model = onnx.load(str(path), load_external_data=False)
    for kind, infos in (("input", model.graph.input), ("output", model.graph.output)):
        want = [(vi.name, types[vi.type.tensor_type.elem_type],
                 [-1 if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]) for vi in infos]
        got = [(n, t, [int(x) for x in d.split(",")]) for n, t, d in blocks[kind]]
        assert got == want
    assert [n for n, _, _ in blocks["input"]] == ["hidden_states", "encoder_hidden_states", "timestep", "ofs"]


def test_cli_export_onnx_check_and_serving_repo(cli_export):
    wait, _, path, repo = cli_export
    proc = wait()
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {path}" in proc.stdout
    for batch in (1, 2):
        line = re.search(rf"check batch {batch}: relative L2 ([0-9.e+-]+)", proc.stdout)
        assert line and float(line.group(1)) < 1e-4
    assert "all supported" in proc.stdout
    config = (repo / "cogvideox_transformer" / "config.pbtxt").read_text()
    assert "dims: [ -1, 3, 4, 8, 12 ]" in config and "TYPE_FP32" in config
    # --batch 2: the engine profile goes up to twice that (CFG doubles the batch).
    assert "maxShapes=hidden_states:4x3x4x8x12" in (repo / "cogvideox_transformer" / "1" / "README.txt").read_text()


def test_cli_export_tensorrt_without_tensorrt(monkeypatch, capsys, tmp_path):
    from cvfast.cli import main
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert main(["export", "tensorrt", "--model", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "pip install tensorrt" in err
    assert "cvfast export onnx" in err and "does not need it" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_export_bad_size_is_one_clear_line(capsys, tmp_path):
    _onnx_stack()
    from cvfast.cli import main
    assert main(["export", "onnx", "--model", "tiny", "--out", str(tmp_path), "--frames", "10"]) == 2
    err = capsys.readouterr().err
    assert "frames=10" in err and "Traceback" not in err


@pytest.mark.parametrize("kw,match", [
    (dict(frames=10), r"frames=10 is not accepted"),
    (dict(height=65), r"height=65 is not accepted"),
    (dict(width=0), r"width=0 is not accepted"),
    (dict(batch=0), r"batch=0 is not accepted"),
    (dict(batch=1.5), r"batch=1.5 is not accepted"),
    (dict(dtype="int8"), r"dtype='int8' is not accepted"),
    (dict(dtype="float16"), r"dtype='float16' is not accepted"),  # 5B overflows in fp16
    (dict(text_len=0), r"text_len=0 is not accepted"),
    (dict(external_data_threshold_bytes=-1), r"external_data_threshold_bytes=-1"),
])
def test_export_rejects_bad_input_before_exporting(kw, match, tmp_path):
    pipe = _pipe("5b")
    args = dict(frames=FRAMES, height=HEIGHT, width=WIDTH) | kw
    with pytest.raises(CVFastInputError, match=match):
        cvfast.export_onnx(pipe, tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_export_uses_the_pipelines_size_rules(tmp_path, caplog):
    """A size the model cannot take is refused; one it was not trained at warns once, as generate() does."""
    with pytest.raises(CVFastInputError, match="learned positional embeddings"):
        cvfast.export_onnx(_pipe("5b-i2v"), tmp_path, frames=17, height=HEIGHT, width=WIDTH)
    with caplog.at_level("WARNING", logger="cvfast"):
        cvfast.export_onnx(_pipe("1.5-i2v"), tmp_path / "i2v", frames=FRAMES, height=HEIGHT, width=WIDTH)
    assert len([r for r in caplog.records if "not a size CogVideoX1.5-I2V was trained at" in r.message]) == 1


def _tiny_model(nodes, inputs, outputs, functions=(), opset=18, initializers=()):
    from onnx import helper
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("local", 1)],
                              functions=list(functions))
    return model


def test_unsupported_ops_flags_hand_built_graphs(tmp_path):
    _onnx_stack()
    import onnx
    from onnx import TensorProto, helper

    from cvfast.export import tensorrt_ops, unsupported_ops
    table = tensorrt_ops()
    assert table["tensorrt_version"].startswith("10.") and "operators.md" in table["source"]
    assert "Unique" in table["unsupported"] and "Unique" not in table["supported"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    # A plain node, an op inside a local function, an op inside an If branch, and a custom domain.
    fn = helper.make_function("local", "Twice", ["a"], ["b"],
                              [helper.make_node("Det", ["a"], ["b"])], [helper.make_opsetid("", 18)])
    branch = helper.make_graph([helper.make_node("MatMulInteger", ["x", "x"], ["z"])], "branch", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None])])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Unique", ["r"], ["u"]),
             helper.make_node("Twice", ["u"], ["t"], domain="local"),
             helper.make_node("If", ["c"], ["i"], then_branch=branch, else_branch=branch),
             helper.make_node("FusedGemm", ["t", "i"], ["y"], domain="com.microsoft")]
    model = _tiny_model(nodes, [x, cond], [y], functions=[fn])
    onnx.save(model, tmp_path / "bad.onnx")
    assert unsupported_ops(tmp_path / "bad.onnx") == ["Det", "MatMulInteger", "Unique", "com.microsoft::FusedGemm"]
    ok = _tiny_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    onnx.save(ok, tmp_path / "ok.onnx")
    assert unsupported_ops(tmp_path / "ok.onnx") == []


def test_signature_check_rejects_a_fixed_batch(tmp_path):
    _onnx_stack()
    import onnx
    from onnx import TensorProto, helper

    from cvfast import ONNXExportError
    from cvfast.export.onnx import verify_signature
    shapes = {"hidden_states": (2,), "noise_pred": (2,)}

    def write(batch_dim):
        x = helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [batch_dim, 2])
        y = helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, [batch_dim, 2])
        onnx.save(_tiny_model([helper.make_node("Relu", ["hidden_states"], ["noise_pred"])], [x], [y]),
                  tmp_path / "m.onnx")
        return tmp_path / "m.onnx"

    verify_signature(write("batch"), ["hidden_states"], shapes, torch.float32)
    with pytest.raises(ONNXExportError, match="batch dimension \\[1\\].*fixed the batch size"):
        verify_signature(write(1), ["hidden_states"], shapes, torch.float32)


def test_bf16_graph_promotion_for_cpu_checks(tmp_path):
    """onnxruntime's CPU provider has no bf16 MatMul; check_onnx then runs the graph promoted to fp32."""
    _onnx_stack()
    import ml_dtypes
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from cvfast.export.validate import promote_to_fp32
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["batch", 3])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Cast", ["m"], ["f"], to=1),
             helper.make_node("Cast", ["f"], ["y"], to=TensorProto.BFLOAT16)]
    model = _tiny_model(nodes, [x], [y], initializers=[numpy_helper.from_array(w, "w")])
    onnx.save(model, tmp_path / "bf16.onnx")
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|Could not find an implementation"):
        ort.InferenceSession(str(tmp_path / "bf16.onnx"), providers=["CPUExecutionProvider"])
    promote_to_fp32(model)
    onnx.save(model, tmp_path / "fp32.onnx")
    session = ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=["CPUExecutionProvider"])
    xs = np.random.default_rng(1).standard_normal((2, 4)).astype(ml_dtypes.bfloat16).astype(np.float32)
    out = session.run(None, {"x": xs})[0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, xs @ w.astype(np.float32), rtol=1e-6, atol=1e-6)
