"""Parallel generation (`cvfast.runtime.parallel`) on CPU processes over gloo, against the single process.

Each spawned job runs several cases in a row (process start-up and imports dominate on a 2-core
machine). The bar: frames within 1e-5 relative L2 of the single-process frames in fp32, for cfg=2,
ulysses=2, ulysses=4 and cfg=2,ulysses=2, on 2B-, 5B- and 1.5-like text-to-video models and 5B-I2V-
and 1.5-I2V-like image-to-video models, most with a video token count the Ulysses degree does not
divide (45 tokens at 9x48x80 on 1.0 models; 30 on 1.5 models, over 4 ranks). The parallel decode
must equal the single-process tiled decode exactly and the untiled decode within the tiling's bound
(on test_vae_tiling's exact grid; generate() refuses vae_tiling=True where the tiny folders' tiles
would change the output size, so the frames cases decode with "auto" or untiled). Rank 0 alone
returns frames.
"""
import dataclasses
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cvfast
from cvfast import CVFastInputError, FirstBlockCache, MagCache, RankFailedError, TeaCache
from cvfast.models.config import VAEConfig
from cvfast.models.vae import CogVideoXVAE
from cvfast.models.vae_tiling import Tiling
from cvfast.runtime.parallel import ParallelConfig, ParallelContext, parse
from tests.fixtures import tiny_folder
from tests.test_image_video import pil, smooth_frame
from tests.test_pipeline import PROMPT
from tests.numerics import rel_l2
from tests.test_vae import vae_pair
from tests.test_vae_tiling import TILED_DECODE_BOUND
from tests.extras import require

require("diffusers")  # the tiny folders are written with diffusers

ROOT = Path(__file__).resolve().parents[1]
SIZE = dict(num_frames=9, height=48, width=80)   # latent 3 x 6 x 10: 45 tokens (1.0), 30 tokens (1.5)
JOB_TIMEOUT_S = 240
FOUR_HEADS = {"num_attention_heads": 4}


# -- running a job of spawned ranks ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, job) -> None:
    """A spawned rank: torchrun's environment, one thread, then `job(rank, out_dir)`. An exception's
    type and message go to error-<rank>.txt and the process exits 1."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        job(rank, Path(out_dir))
    except Exception as exc:
        Path(out_dir, f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        sys.exit(1)


def run_job(job, world: int, out_dir: Path, timeout: float = JOB_TIMEOUT_S) -> tuple[list[int], float]:
    """Run `job` on `world` spawned ranks; returns their exit codes and the seconds until all ended."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world, port, str(out_dir), job)) for rank in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(1.0, timeout - (time.monotonic() - start)))
    elapsed = time.monotonic() - start
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs], elapsed


def _load(case: dict):
    return cvfast.load(case["folder"], device="cpu", dtype=torch.float32, backend=case.get("backend", "reference"),
                       parallel=case.get("parallel"))


def _generate_kwargs(case: dict) -> dict:
    kw = dict(prompt=PROMPT, num_inference_steps=2, seed=7, progress=False, max_sequence_length=16,
              allow_untrained_size=True, **SIZE) | case.get("kwargs", {})
    if case.get("image"):
        kw["image"] = pil(smooth_frame(kw["height"], kw["width"]))
    return kw


class FramesJob:
    """Each rank loads every case's pipeline in parallel mode and generates; rank r saves what it got
    (None on ranks other than 0) and how its transformer split the video tokens as <case>-<r>.pt.
    A "vae" case runs the parallel decode of saved latents through a saved VAE instead."""

    def __init__(self, cases: list[dict]):
        self.cases = cases

    def __call__(self, rank: int, out: Path) -> None:
        for i, case in enumerate(self.cases):
            split = cache = None
            if "vae" in case:
                got = _parallel_decode(case)
            else:
                pipe = _load(case)
                result = pipe.generate(**_generate_kwargs(case))
                got, cache = (None, None) if result is None else (torch.from_numpy(result.frames), result.cache)
                sequence = pipe.transformer.sequence_parallel
                split = sequence.split.sizes if sequence is not None else None
            torch.save(dict(got=got, split=split, cache=cache), out / f"{i}-{rank}.pt")


def _parallel_decode(case: dict):
    from cvfast.runtime.parallel import decode
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    vae = _saved_vae(case["vae"])
    return decode.decode(vae, torch.load(case["latents"]), case["vae_tiling"], dist.get_rank(), dist.get_world_size())


def single_process(case: dict):
    return _load(case | {"parallel": None}).generate(**_generate_kwargs(case))


def check_frames_job(cases: list[dict], world: int, tmp_path: Path) -> list[float]:
    codes, _ = run_job(FramesJob(cases), world, tmp_path)
    assert codes == [0] * world, [(tmp_path / f"error-{r}.txt").read_text() for r in range(world)
                                   if (tmp_path / f"error-{r}.txt").exists()]
    errors = []
    for i, case in enumerate(cases):
        saved = [torch.load(tmp_path / f"{i}-{r}.pt") for r in range(world)]
        assert all(s["got"] is None for s in saved[1:]), case
        assert all(s["split"] == case.get("split") for s in saved), (case, saved[0]["split"])
        got = saved[0]["got"]
        if "vae" in case:
            errors.append(check_decode(case, got))
            continue
        one = single_process(case)
        expected = one.frames
        assert got.shape == expected.shape and np.isfinite(expected).all() and expected.std() > 1e-3
        if one.cache is not None:  # the same steps computed; a rank's cache holds its share of the rows
            assert saved[0]["cache"]["computed_steps"] == one.cache["computed_steps"], case
            assert 0 < len(one.cache["skipped_steps"]) and saved[0]["cache"]["bytes"] < one.cache["bytes"]
        errors.append(rel_l2(got.numpy(), expected))
        assert errors[-1] <= 1e-5, (case["parallel"], case["folder"].name, errors[-1])
    print("relative L2 per case:", errors)
    return errors


def check_decode(case: dict, got: torch.Tensor) -> float:
    """The parallel decode equals the single-process tiled decode exactly, and the untiled decode
    within the tiling's own bound (measured on this VAE and latent, tests/test_vae_tiling.py)."""
    vae, latents = _saved_vae(case["vae"]), torch.load(case["latents"])
    assert torch.equal(got, vae.decode_latents(latents, tiling=Tiling.for_vae(vae.config)))
    err = rel_l2(got.numpy(), vae.decode_latents(latents).numpy())
    assert 0.05 < err < TILED_DECODE_BOUND  # > 0.05: the decode really was tiled
    return err


def decode_case(tmp_path: Path, vae_tiling: bool | str) -> dict:
    """test_vae_tiling's exact case: a VAE whose tiles (6x10 latents, stride 5x8) fit exactly, and a
    13x21 latent: 3 x 3 tiles, so the last round of tiles leaves some ranks idle. A parallel decode
    tiles with vae_tiling "auto" too, on such a VAE."""
    _, vae = vae_pair(sample_height=96, sample_width=160)
    torch.save(dict(config=dataclasses.asdict(vae.config), state=vae.state_dict()), tmp_path / "vae.pt")
    z = torch.randn(1, 4, 3, 13, 21, generator=torch.Generator().manual_seed(1))
    # In the sampler's layout (batch, frames, channels, h, w), scaled, as the pipeline decodes them.
    torch.save(z.permute(0, 2, 1, 3, 4) * vae.config.scaling_factor, tmp_path / "latents.pt")
    return dict(vae=tmp_path / "vae.pt", latents=tmp_path / "latents.pt", vae_tiling=vae_tiling)


def _saved_vae(path: Path) -> CogVideoXVAE:
    saved = torch.load(path)
    vae = CogVideoXVAE(VAEConfig.from_dict(saved["config"])).eval()
    vae.load_state_dict(saved["state"])
    return vae


# -- frames equal the single process --------------------------------------------------------------

def test_two_ranks_cfg_and_ulysses_equal_one_process(tmp_path):
    five_b, two_b = tiny_folder("5b", transformer_overrides=FOUR_HEADS), tiny_folder("2b")
    cases = [
        # CFG branches on two ranks; DPM (its noise drawn alike on both) with dynamic CFG
        dict(folder=tiny_folder("5b", "dpm"), parallel="cfg=2", kwargs=dict(use_dynamic_cfg=True, vae_tiling="auto")),
        # 45 video tokens over 2 ranks, 2 of the 4 heads each; rank 0 decodes untiled alone
        dict(folder=five_b, parallel="ulysses=2", split=(23, 22), kwargs=dict(vae_tiling=False)),
        # 2B: sincos positions added before the split; without CFG; through the SDPA backend
        dict(folder=two_b, parallel="ulysses=2", split=(23, 22), backend="auto",
             kwargs=dict(guidance_scale=1.0, vae_tiling="auto")),
        # image-to-video: 5B-I2V (learned positions: its table size, 72 tokens) and 1.5-I2V (ofs). Untiled:
        # the tiny VAE's tiles do not fit a 64x96 encode exactly (`Tiling.exact_for`)
        dict(folder=tiny_folder("5b-i2v", "dpm"), parallel="ulysses=2", split=(36, 36), image=True,
             kwargs=dict(num_frames=9, height=64, width=96, vae_tiling=False)),
        dict(folder=tiny_folder("1.5-i2v"), parallel="cfg=2", image=True, kwargs=dict(vae_tiling=False)),
        # step caches: FirstBlockCache combines the CFG halves' sums before deciding; TeaCache's
        # schedule is the same on every rank
        dict(folder=tiny_folder("5b", "dpm"), parallel="cfg=2",
             kwargs=dict(num_inference_steps=6, cache=FirstBlockCache(1.2), vae_tiling=False)),
        dict(folder=five_b, parallel="ulysses=2", split=(23, 22),
             kwargs=dict(num_inference_steps=6, cache=TeaCache(2.0, (0.0, 0.0, 0.0, 1.0, 0.0)), vae_tiling=False)),
        decode_case(tmp_path, True),   # 9 tiles over 2 ranks
    ]
    check_frames_job(cases, 2, tmp_path)


def test_four_ranks_ulysses_and_cfg_with_ulysses_equal_one_process(tmp_path):
    five_b = tiny_folder("5b", transformer_overrides=FOUR_HEADS)
    one_five = tiny_folder("1.5", "dpm", transformer_overrides=FOUR_HEADS)
    cases = [
        dict(folder=five_b, parallel="ulysses=4", split=(12, 11, 11, 11), kwargs=dict(vae_tiling="auto")),
        dict(folder=one_five, parallel="ulysses=4", split=(8, 8, 7, 7), kwargs=dict(vae_tiling="auto")),
        dict(folder=one_five, parallel="cfg=2,ulysses=2", split=(23, 22),   # 17 frames: 45 tokens
             kwargs=dict(num_frames=17, use_dynamic_cfg=True, vae_tiling="auto")),
        dict(folder=tiny_folder("1.5-i2v"), parallel="cfg=2,ulysses=2", split=(15, 15), image=True,
             kwargs=dict(vae_tiling=False)),
        # FirstBlockCache's decision from sums over both groups; MagCache's schedule on every rank
        dict(folder=five_b, parallel="cfg=2,ulysses=2", split=(38, 37),   # 17 frames: 75 tokens
             kwargs=dict(num_frames=17, num_inference_steps=6, cache=FirstBlockCache(1.2), vae_tiling=False)),
        dict(folder=five_b, parallel="ulysses=4", split=(12, 11, 11, 11),
             kwargs=dict(num_inference_steps=6, cache=MagCache(0.3, ratios=[1.0, 0.9, 1.1, 1.0, 0.8, 1.2],
                                                               max_skip_steps=2), vae_tiling=False)),
        decode_case(tmp_path, "auto"),   # 9 tiles over 4 ranks
    ]
    check_frames_job(cases, 4, tmp_path)


# -- failure on one rank ----------------------------------------------------------------------------

class FailingJob:
    """cfg=2 on two ranks; `failing` raises in its transformer's second call."""

    def __init__(self, folder: Path, failing: int):
        self.folder, self.failing = folder, failing

    def __call__(self, rank: int, out: Path) -> None:
        pipe = _load(dict(folder=self.folder, parallel="cfg=2"))
        if rank == self.failing:
            calls, forward = [], pipe.transformer.forward

            def failing_forward(*args, **kwargs):
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError(f"injected failure on rank {rank}")
                return forward(*args, **kwargs)
            pipe.transformer.forward = failing_forward
        pipe.generate(**_generate_kwargs(dict(kwargs=dict(num_inference_steps=4))))


@pytest.mark.parametrize("failing", [0, 1])  # 0 also hosts the store the ranks rendezvoused through
def test_an_error_on_one_rank_ends_every_rank_with_it(tmp_path, failing):
    codes, _ = run_job(FailingJob(tiny_folder("5b"), failing), 2, tmp_path, timeout=120)
    assert all(code not in (0, None) for code in codes), codes  # None: still running, killed at the timeout
    message = f"injected failure on rank {failing}"
    assert (tmp_path / f"error-{failing}.txt").read_text() == f"RuntimeError: {message}"
    other = (tmp_path / f"error-{1 - failing}.txt").read_text()
    assert other == f"{RankFailedError.__name__}: rank {failing}: RuntimeError: {message}"


# -- the command line under torchrun ----------------------------------------------------------------

def test_cli_under_torchrun_writes_one_video_from_rank_0(tmp_path):
    out = tmp_path / "video.mp4"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cvfast",
           "generate", "--model", str(tiny_folder("5b")), "--prompt", PROMPT, "--parallel", "cfg=2",
           "--frames", "9", "--height", "48", "--width", "80", "--steps", "2", "--seed", "3", "--out", str(out),
           "--no-progress"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and out.stat().st_size > 0


# -- bad configurations, before anything loads ------------------------------------------------------

@pytest.mark.parametrize("value,message", [
    ("cfg=3", "cfg=1 or cfg=2"),
    ("ulysses=0", "ulysses must be an integer >= 1"),
    ("ulysses=two", "ulysses must be an integer >= 1"),
    ("tp=2", "'tp=2' is not KEY=N"),
    ("cfg=2,cfg=2", "cfg given twice"),
    ("", "is not KEY=N"),
    (2, "a string"),
    (ParallelConfig(cfg=0), "cfg must be an integer >= 1"),
])
def test_bad_parallel_strings_are_refused(value, message):
    with pytest.raises(CVFastInputError, match="parallel=") as info:
        parse(value)
    assert message in str(info.value)


def test_parse_reads_both_degrees():
    assert parse("cfg=2, ulysses=4") == ParallelConfig(cfg=2, ulysses=4)
    assert parse("ulysses=2") == ParallelConfig(cfg=1, ulysses=2)
    assert parse(None) is None


@pytest.fixture
def no_weights(monkeypatch):
    """Fails a test that reads any weights: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the parallel checks")
    monkeypatch.setattr(cvfast.checkpoints.diffusers, "read_tensors", refuse)


@pytest.mark.parametrize("world,value,kwargs,message", [
    (None, "ulysses=2", {}, "torchrun --nproc-per-node 2"),
    ("2", "cfg=2,ulysses=2", {}, "world size 2: cfg * ulysses = 4"),
    ("4", "ulysses=4", {}, "ulysses must divide the model's 2 attention heads"),
    ("2", "cfg=2", dict(offload="model"), "offload='model' is not accepted"),
    ("2", "cfg=2", dict(cuda_graph=True), "cuda_graph=True is not accepted"),
])
def test_bad_configurations_fail_before_loading(monkeypatch, no_weights, world, value, kwargs, message):
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(CVFastInputError) as info:
        cvfast.load(tiny_folder("5b"), device="cpu", parallel=value, **kwargs)
    assert message in str(info.value)


def test_one_rank_configuration_is_the_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    pipe = cvfast.load("tiny", device="cpu", parallel="cfg=1,ulysses=1")
    assert pipe.parallel is None


def test_cli_reports_a_bad_parallel_value(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from cvfast.cli import main
    assert main(["generate", "--prompt", "x", "--parallel", "cfg=3", "--out", "x.mp4"]) == 2
    assert "--parallel 'cfg=3' is not accepted" in capsys.readouterr().err


def test_export_refuses_a_parallel_pipeline():
    loaded = cvfast.load("tiny", device="cpu")
    context = ParallelContext.__new__(ParallelContext)  # the check needs no process group
    context.cfg_group = None
    pipe = cvfast.Pipeline(loaded.components, dataclasses.replace(loaded.runtime, parallel=context))
    with pytest.raises(CVFastInputError, match="without parallel="):
        cvfast.export_onnx(pipe, "unused", frames=9, height=64, width=96)


def test_cfg_parallel_refuses_guidance_without_cfg_before_any_work(monkeypatch):
    loaded = cvfast.load("tiny", device="cpu")
    context = ParallelContext.__new__(ParallelContext)  # the checks need no process group
    context.config, context.cfg_group = ParallelConfig(cfg=2), None
    pipe = cvfast.Pipeline(loaded.components, dataclasses.replace(loaded.runtime, parallel=context))
    monkeypatch.setattr(pipe, "encode_prompts", lambda *a: pytest.fail("work started"))
    with pytest.raises(CVFastInputError, match="guidance_scale=1.0 is not accepted: > 1 with parallel='cfg=2,ulysses=1'"):
        pipe.generate("x", guidance_scale=1.0, num_inference_steps=1)
