"""The CPU-side parts of benchmarks/run.py: argument handling, JSON and markdown writing, skipping
what the device lacks, and the diffusers baseline computing what cvfast computes."""
import json
import sys
from pathlib import Path

import pytest
import torch
from tests.extras import require

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import run  # noqa: E402


@pytest.mark.parametrize("argv,message", [
    (["--suite", "fastest"], "invalid choice"),
    (["--frames", "0"], "--frames=0"),
    (["--backends", "reference,warp"], "warp"),
    (["--model", "7b"], "invalid choice"),
    (["--suite", "ops", "--parallel", "cfg=2"], "--parallel: only with --suite e2e"),
    (["--suite", "roofline", "--cache", "teacache"], "--cache: only with --suite e2e"),
    (["--suite", "gpu", "--parts", "step,lunch"], "--parts=step,lunch: expected some of ceilings,step,"),
    (["--suite", "ops", "--parts", "step"], "--parts: only with --suite gpu"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err


def load(path):
    record = json.loads(Path(path).read_text())
    for key in ("suite", "date", "args", "env", "ceilings", "summary", "rows"):
        assert key in record
    assert record["env"]["torch"] == torch.__version__
    return record


def test_default_run_writes_valid_json(tmp_path):
    record = load(run.main(["--json", str(tmp_path / "d.json")]))
    cases = {(r["suite"], r["backend"]) for r in record["rows"]}
    assert ("ops", "reference") in cases and ("ops", "sdpa") in cases
    assert ("e2e", "reference") in cases and ("e2e", "auto") in cases
    for row in record["rows"]:
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert record["ceilings"]["matmul_tflops"] > 0 and record["ceilings"]["copy_gbps"] > 0


def test_e2e_with_diffusers_baseline_measures_both_with_ratios(tmp_path):
    require("diffusers")
    record = load(run.main(["--suite", "e2e", "--baseline", "diffusers", "--steps", "2", "--backends", "auto",
                            "--json", str(tmp_path / "e.json")]))
    rows = {(r["case"], r["backend"]): r for r in record["rows"]}
    for stage in ("text_encoding", "one_step", "loop", "decode"):
        ours, theirs = rows[(f"tiny {stage}", "auto")], rows[(f"tiny {stage}", "diffusers")]
        assert ours["extra"]["speedup_vs_diffusers"] == pytest.approx(theirs["median_ms"] / ours["median_ms"])
    # Same weights and seed: diffusers' latents are cvfast's to fp32 rounding.
    assert rows[("tiny loop", "diffusers")]["extra"]["latents_rel_l2_vs_auto"] < 1e-5


def test_e2e_with_a_cache_measures_the_cached_loop_beside_the_uncached_one(tmp_path):
    record = load(run.main(["--suite", "e2e", "--cache", "teacache", "--steps", "6", "--backends", "auto",
                            "--json", str(tmp_path / "c.json")]))
    rows = {(r["case"], r["backend"]): r for r in record["rows"]}
    cached, uncached = rows[("tiny loop", "auto (teacache)")], rows[("tiny loop", "auto")]
    # The tiny model's TeaCache preset skips every step between the first and the last one.
    assert cached["extra"]["computed_steps"] == [0, 5] and cached["extra"]["skipped_steps"] == [1, 2, 3, 4]
    assert cached["extra"]["speedup_vs_auto"] == pytest.approx(uncached["median_ms"] / cached["median_ms"])
    assert cached["extra"]["iters"] == uncached["extra"]["iters"] == 3
    assert 0 < cached["extra"]["latents_rel_l2_vs_auto"] < 1


def test_e2e_parallel_under_torchrun_reports_the_speedup_over_one_rank(tmp_path):
    """Two gloo ranks on the CPU: the plumbing and the ratios, not a speed claim (the ranks share
    this machine's cores)."""
    import os
    import subprocess
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "benchmarks" / "run.py"), "--suite", "e2e", "--parallel", "cfg=2", "--steps", "2",
           "--backends", "auto", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["case"], r["backend"]): r for r in load(out)["rows"]}
    for stage in ("text_encoding", "one_step", "loop", "decode"):
        one, job = rows[(f"tiny {stage}", "auto (1 rank)")], rows[(f"tiny {stage}", "auto (cfg=2)")]
        assert job["extra"]["speedup_vs_auto (1 rank)"] == pytest.approx(one["median_ms"] / job["median_ms"])
    # CFG branches on two ranks (batch 1 each) give one rank's latents to fp32 rounding.
    assert rows[("tiny loop", "auto (cfg=2)")]["extra"]["latents_rel_l2_vs_auto (1 rank)"] < 1e-5


def test_gpu_suite_on_a_cpu_skips_what_needs_cuda_and_writes_markdown(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the suite would run for real")
    require("diffusers")
    require("matplotlib")
    out = run.main(["--suite", "gpu", "--json", str(tmp_path / "g.json")])
    record = load(out)
    skipped = {r["case"]: r["extra"]["skipped"] for r in record["rows"] if "skipped" in r["extra"]}
    assert "no CUDA device" in skipped["pytest tests/test_cuda.py"]
    # The step part: the tiny model eager and compiled, diffusers eager and compiled, side by side.
    step = {r["backend"]: r for r in record["rows"] if r["suite"] == "step" and "step" in r["case"]}
    assert set(step) == {"auto", "auto+compile", "diffusers", "diffusers+compile"}
    assert all(r["median_ms"] > 0 for r in step.values())
    assert "compile_s" in step["auto+compile"]["extra"] and "compile_s" in step["diffusers+compile"]["extra"]
    summary = record["summary"]["step_tiny"]
    assert set(summary["cvfast_s"]) == {"auto", "auto+compile"} and summary["diffusers_compiled_s"] > 0
    assert summary["best_vs_diffusers_eager"] == pytest.approx(
        summary["cvfast_s"][summary["best"]] / summary["diffusers_eager_s"])
    assert summary["best_bf16"] == summary["best"]  # both configurations are bf16 (unquantized) here
    decode = next(r for r in record["rows"] if r["case"].startswith("tiny decode"))
    assert summary["projected_50_steps_s"]["auto"] == pytest.approx(
        50 * summary["cvfast_s"]["auto"] + decode["median_ms"] / 1e3)
    # The per-op profile of one auto call: the ops that take the time, each with its share.
    profile = next(r for r in record["rows"] if r["case"].endswith("profile"))
    shares = [entry["share"] for entry in profile["extra"]["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < profile["extra"]["covered"] <= 1
    assert profile["extra"]["covered"] == pytest.approx(sum(shares))
    # The graph part measures the eager step on the CPU and skips the graph.
    graph_rows = {r["backend"]: r for r in record["rows"] if r["suite"] == "graph"}
    assert graph_rows["cuda graph"]["extra"]["skipped"] == "no CUDA device"
    eager = graph_rows["eager"]  # measured, with its host time per step (no timing is asserted)
    assert eager["median_ms"] > 0 and eager["extra"]["host_ms_per_step"] > 0
    # The fp8 part skips its kernels and runs the step and the gate on the tiny model (the emulation).
    fp8 = {(r["case"], r["backend"]): r["extra"] for r in record["rows"] if r["suite"] == "fp8"}
    assert "compute capability 8.9" in fp8[("kernels", "-")]["skipped"]
    assert fp8[("tiny check-precision 4 steps", "fp8")]["passed"] is True
    assert "int8-emulated" in fp8[("tiny step batch 2 9x64x96", "fp8")]["backends"]
    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith("# gpu suite, cpu") and "| step | tiny step 9x64x96 CFG | auto |" in markdown
    assert "| graph | tiny step | eager |" in markdown and "host_ms_per_step" in markdown
    # run.py draws the run it made beside its JSON: the step side by side, the ops.
    assert (tmp_path / "g-step.png").stat().st_size > 0 and (tmp_path / "g-ops.png").stat().st_size > 0


def test_gpu_suite_saves_its_record_after_every_part(tmp_path, monkeypatch):
    """A run stopped from outside keeps what it measured: the JSON on disk grows part by part."""
    from benchmarks import suite_gpu
    seen = []

    def recording_save(rows, summary, ceil):
        seen.append([row.suite if row.suite != "gpu" else row.case for row in rows])
    monkeypatch.setattr(suite_gpu, "run_step", lambda *a, **k: ([run.Row("step", "s", "auto", 1.0)], {}))
    monkeypatch.setattr(suite_gpu, "run_fp8", lambda device: [run.Row("fp8", "f", "fp8", 1.0)])
    monkeypatch.setattr(suite_gpu, "run_ops", lambda *a, **k: [run.Row("ops", "o", "sdpa", 1.0)])
    monkeypatch.setattr(suite_gpu, "run_graph", lambda *a, **k: [run.Row("graph", "g", "eager", 1.0)])
    args = run.defaults_for(run.parse_args(["--suite", "gpu"]), torch.device("cpu"))
    suite_gpu.run_gpu(args, torch.device("cpu"), recording_save)
    done = ["step", "ops", "fp8", "graph", "build native extension", "pytest tests/test_cuda.py"]  # the last two skipped
    assert seen == [done[:n] for n in range(7)]  # the ceilings add no row
    seen.clear()  # `make gpu-test`'s call: the build and the tests alone
    args = run.defaults_for(run.parse_args(["--suite", "gpu", "--parts", "build,tests"]), torch.device("cpu"))
    suite_gpu.run_gpu(args, torch.device("cpu"), recording_save)
    assert seen == [done[4:5], done[4:]]


def test_roofline_through_the_entry_point(tmp_path):
    record = load(run.main(["--suite", "roofline", "--model", "2b", "--json", str(tmp_path / "r.json")]))
    assert record["summary"]["forward_tflop"] == pytest.approx(120.0, rel=0.01)
    assert record["rows"] and all(r["backend"] == "floor" for r in record["rows"])


def test_plot_draws_every_run_file(tmp_path):
    require("matplotlib")
    from benchmarks import plot
    record = run.main(["--suite", "e2e", "--steps", "1", "--json", str(tmp_path / "e.json")])
    pngs = plot.main([str(record), "--out", str(tmp_path / "plots")])
    assert [p.name for p in pngs] == ["e-e2e.png"]
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_failure_is_logged_as_it_happens(tmp_path):
    """tests/conftest.py, for the gpu suite's test part: a failure's report reaches the log file
    named by CVFAST_FAILURE_LOG before the run ends (so a run stopped by its budget keeps it)."""
    import os
    import subprocess
    failing = tmp_path / "test_planted.py"
    failing.write_text("def test_planted():\n    assert 1 + 1 == 3, 'planted failure'\n\n"
                       "def test_fine():\n    pass\n")
    log = tmp_path / "failures.txt"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           str(failing)], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, CVFAST_FAILURE_LOG=str(log)))
    assert proc.returncode == 1
    text = log.read_text()
    assert "test_planted.py::test_planted (call)" in text and "planted failure" in text
    assert "test_fine" not in text


def test_an_unsteady_row_is_flagged(capsys, monkeypatch):
    """p80/p20 above 1.5 marks the row and warns (the machine's load is in every record's env). The
    times are given, not measured, so the check does not depend on this machine's load."""
    from benchmarks import harness
    spread = {}
    monkeypatch.setattr(harness, "timed", lambda fn, device, **kw: dict(median_ms=2.0, peak_gib=None, **spread))
    spread.update(p20_ms=1.0, p80_ms=1.6)
    row = harness.measured_row("ops", "case", "x", lambda: None, torch.device("cpu"))
    assert row.extra["unsteady_p80_over_p20"] == pytest.approx(1.6)
    assert "do not quote this row" in capsys.readouterr().err
    spread.update(p20_ms=1.0, p80_ms=1.5)
    steady = harness.measured_row("ops", "case", "x", lambda: None, torch.device("cpu"))
    assert "unsteady_p80_over_p20" not in steady.extra and capsys.readouterr().err == ""
    assert len(harness.environment(torch.device("cpu"))["load_average"]) == 3


def test_the_readme_performance_table_is_the_newest_results_file():
    """README.md shows what `python benchmarks/readme_table.py` makes of the newest GPU results file:
    committing a new file without regenerating the table fails here."""
    from benchmarks import readme_table
    text = readme_table.README.read_text()
    shown = text[text.index(readme_table.BEGIN):text.index(readme_table.END) + len(readme_table.END)]
    assert shown == readme_table.table()


def test_the_step_table_ratios():
    from benchmarks import readme_table
    step = {"diffusers_eager_s": 2.0, "diffusers_compiled_s": 1.6, "cvfast_s": {"auto": 1.0, "auto+graph": 0.8},
            "projected_50_steps_s": {"auto": 52.2}}
    lines = readme_table.step_table(step)
    assert "| cvfast auto | 1.000 s | 0.50x | 0.62x | 52.200 s |" in lines
    assert "| cvfast auto+graph | 0.800 s | 0.40x | 0.50x | - |" in lines


def test_profile_writes_a_chrome_trace_of_one_step(tmp_path):
    run.main(["--suite", "e2e", "--steps", "1", "--backends", "auto", "--json", str(tmp_path / "e.json"),
              "--profile", str(tmp_path / "trace.json")])
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert any("addmm" in event.get("name", "") for event in events)  # the transformer's linears ran
