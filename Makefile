# The two commands of the README: `make demo` and `make test`. Both create .venv if absent.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
STAMP   := $(VENV)/.cvfast-installed
TSTAMP  := $(VENV)/.cvfast-test-installed
# Without CUDA the CPU wheel (on this kind of machine it comes from local disk) and the Triton
# release the interpreter tests were run with; with an NVIDIA driver, pip's default (CUDA) build,
# which brings its own Triton. An already installed torch is never replaced.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0 triton==3.8.0)

.PHONY: install demo test clean gpu-check gpu-test gpu-wheels

$(PY):
	python3 -m venv $(VENV)

# The native extension cvfast._C is built by CMake against the torch installed here, hence
# --no-build-isolation and a setuptools that builds editable wheels itself (>= 70.1); CVFAST_BUILD_EXT=0
# in the environment skips it. A failed build warns and leaves a pure-Python install.
INSTALL := $(PIP) install --no-build-isolation -c constraints.txt

$(STAMP): $(PY) setup.py constraints.txt CMakeLists.txt $(wildcard csrc/*)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install "setuptools>=70.1"
	$(INSTALL) -e .
	touch $@

$(TSTAMP): $(STAMP)
	$(INSTALL) -e ".[test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m cvfast generate --model tiny --prompt "a red panda eating bamboo in a misty forest" \
		--seed 0 --steps 50 --out demo.mp4 --no-progress

# With nvcc on the PATH, every csrc/*.cu must compile for sm_90 (even where no GPU will run it);
# ptxas's register/spill/smem report: build/nvcc/ptxas.log.
# The layer contract (.importlinter) fails the run on an import that climbs a layer. Every test extra
# is installed here, so a missing one fails its tests instead of skipping them (tests/extras.py);
# -rs prints the reason of every skip (without a GPU: the CUDA and TensorRT tests).
test: $(TSTAMP)
	@if command -v nvcc >/dev/null 2>&1; then $(PY) csrc/nvcc_check.py; else echo "nvcc not found: CUDA sources not compiled"; fi
	$(VENV)/bin/lint-imports
	CVFAST_REQUIRE_TEST_EXTRAS=1 $(PY) -m pytest -q -rs tests

# The prepared device script, for a lent H100/H200 (README, "Benchmarks"): one device call that carries
# [".whl"] (diffusers 0.42.1, importlib_metadata and sageattention 1.0.6, downloaded here once) runs `make gpu-check`; its
# JSON and markdown land in $OUT, rewritten after every part. The suite fits its parts into its
# budget (430 s, tests last); the timeout is the backstop that keeps the call under the 8 minutes a
# check may take, and what was measured before it is already on disk. `make gpu-test` is the second
# call where the device time allows (about 4 minutes): the native build and tests/test_cuda.py alone.
GPU_SUITE = PYTHONPATH=/tmp/site:$$PYTHONPATH PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 \
	timeout $(1) python3 benchmarks/run.py --suite gpu

gpu-wheels:
	if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; fi

gpu-check: gpu-wheels
	$(call GPU_SUITE,470) --json $${OUT:-benchmarks/results}/gpu.json

gpu-test: gpu-wheels
	$(call GPU_SUITE,240) --parts build,tests --budget-s 220 --json $${OUT:-benchmarks/results}/gpu-tests.json

clean:
	rm -rf $(VENV) build *.egg-info demo.mp4
