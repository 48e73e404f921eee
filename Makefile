# masked_ops: set-up, tests, demo and benchmarks. Every target installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
TORCHVISION_VERSION ?= 0.28.0
# The registry's full (CUDA) torch build: torchvision and timm import with it, and the CUDA
# extension compiles and links against it. The machines' pip config points at a local
# CPU-only torch wheel, so torch itself is installed with that config switched off.
REGISTRY_PIP := PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(PIP)
PYTEST_ARGS ?=

.PHONY: all torch install build wheel test test-fast test-gpu demo bench bench-gpu bench-gpu-lime cmake-build clean

all: test

torch:
	@$(PYTHON) -c "import torch, torchvision, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null \
	  || $(REGISTRY_PIP) install "torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"

# --no-build-isolation builds against the torch installed above, so the build tools must be
# here too. Builds masked_ops._C in place (the CPU kernels) and masked_ops._C_cuda (the CUDA kernels)
# where a GPU can run them or MASKED_OPS_CUDA=1 asks (CI: so CUDA code that does not compile never
# lands), and installs the package editable with every optional dependency. The stamp
# lets `make demo` after `make test` (or the reverse) skip a second build; it is redone when the
# build files or the C++/CUDA sources change, and `make clean` forces it.
install: .install.stamp
.install.stamp: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
	@$(MAKE) --no-print-directory torch
	$(PIP) install -q "setuptools>=77" wheel ninja
	$(PIP) install -e ".[all]" --no-build-isolation
	@touch $@

# Rebuild the extension in place after editing csrc/ (no dependency resolution).
build:
	$(PYTHON) setup.py -q build_ext --inplace

# A wheel in dist/, laid out as compiled PyTorch extensions ship: masked_ops/_C (the CPU kernels; links
# only what every torch build has, so it loads with the CPU torch too) and, where CUDA kernels are built
# (MASKED_OPS_CUDA=1, or a GPU here), masked_ops/_C_cuda. Built against the torch installed here: a
# wheel is for one torch version. tests/test_wheel.py installs it into a fresh venv with the CPU torch.
# build/lib* is emptied first: bdist_wheel packs all of it, and a library left there by another build
# (a _C_cuda of an earlier MASKED_OPS_CUDA=1 build) must not ride along; the compiled objects
# (build/temp*) stay, so only what changed is recompiled.
WHEEL_DIR ?= dist
wheel: torch
	$(PIP) install -q "setuptools>=77" wheel ninja
	rm -rf build/lib.* build/bdist.*
	$(PIP) wheel -q --no-build-isolation --no-deps -w $(WHEEL_DIR) .

test: install cmake-build
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# The GPU machine has torch, torchvision, timm and Triton but reaches no registry:
# build against its torch, then run only the GPU tests (only the files that have any, so a test
# module needing a package that machine lacks cannot break collection); log under $$OUT if set.
# MASKED_OPS_CUDA=1: a CUDA kernel that does not build is an error, not a silent CPU-only build.
# Logs (and the benchmark results) are also copied under $$OUT when the device tool sets it.
GPU_INSTALL := MASKED_OPS_CUDA=1 $(PIP) install --no-build-isolation --no-deps -e .
test-gpu:
	$(GPU_INSTALL)
	$(PYTHON) -c "import torch, masked_ops as mo; print(torch.__version__, torch.cuda.get_device_name(0), {b: mo.available(b) for b in ('cuda', 'triton')})"
	mkdir -p $${OUT:-build}; $(PYTHON) -m pytest -q -m gpu $$(grep -l "mark.gpu" tests/test_*.py) -rs \
	  --durations=15 -p no:cacheprovider $(PYTEST_ARGS) > $${OUT:-build}/test-gpu.log 2>&1; \
	  rc=$$?; cat $${OUT:-build}/test-gpu.log; exit $$rc

demo: install
	$(PYTHON) -m masked_ops.cli explain --demo

# Ops, compile policy, whole models (eager and torch.compile) and soft-mask steps, interleaved:
# bench/results/cpu-<date>.json. The end-to-end benchmarks (bench_lime.py, bench_learned.py,
# bench_imputation.py, bench_dataset.py, bench_explainers.py, bench_vit.py, bench_diffmask_learns.py)
# run on their own: commands in bench/README.md.
bench: install
	$(PYTHON) bench/run.py --device cpu $(BENCH_ARGS)

bench-gpu:
	$(GPU_INSTALL)
	mkdir -p $${OUT:-build}; $(PYTHON) bench/run.py --device cuda $(BENCH_ARGS) > $${OUT:-build}/bench-gpu.log 2>&1; \
	  rc=$$?; cat $${OUT:-build}/bench-gpu.log; \
	  if [ -n "$$OUT" ]; then cp bench/results/gpu-*.json "$$OUT"/ 2>/dev/null; fi; exit $$rc

# Issue 5's GPU figure: LIME with 1,000 samples on ResNet-50, end to end (our grey and layer masking,
# the lime package), written to bench/results/cuda-lime-<date>.json (and $$OUT).
bench-gpu-lime:
	$(GPU_INSTALL)
	mkdir -p $${OUT:-build}; $(PYTHON) bench/bench_lime.py --device cuda --model resnet50 --repeats 5 \
	  > $${OUT:-build}/bench-gpu-lime.log 2>&1; rc=$$?; grep -v "it/s" $${OUT:-build}/bench-gpu-lime.log; \
	  if [ -n "$$OUT" ]; then cp bench/results/cuda-lime-*.json "$$OUT"/ 2>/dev/null; fi; exit $$rc

# The same sources built against libtorch with CMake, so CMakeLists.txt cannot rot.
cmake-build: torch
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$$(command -v $(PYTHON))" \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake

clean:
	rm -rf build dist *.egg-info masked_ops/_C*.so .install.stamp
