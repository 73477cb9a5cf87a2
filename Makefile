# splinet_cuda: `make test` and `make bench` set everything up from a fresh machine.
#   make test        venv + deps + build + CUDA compile check (when nvcc exists) + docs + tests
#                    + sanitize + racecheck
#   make bench       venv + deps + build + quick benchmark suite (table; results and plots in build/bench/)
#   make cuda-check  compile every csrc/cuda/*.cu for sm_80 and sm_90 (no GPU needed)
#   make triton-check  compile the Triton kernels for sm_90 with triton 3.6.0 and the installed one
#   make docs        the Sphinx documentation into build/docs/ (warnings are errors, nitpicky)
#   make sanitize    the CPU and emulation extensions built with ASan + UBSan in build/sanitize/,
#                    the CPU tests under them (the CI subset; SANITIZE_TESTS=all: every CPU test)
#   make racecheck   the emulation extension built with ThreadSanitizer in build/tsan/, the CUDA
#                    block programs run by host thread teams under it (tests/test_races.py): no
#                    report allowed, and each barrier deleted in turn must be reported where expected
#   make fuzz        the property-based tests (tests/test_properties.py) with the long profile
#   make gpu-check   on a GPU machine, offline, with its own python3: build for the local GPU,
#                    `python -m splinet_cuda info` and `selftest --device cuda`, pytest -m gpu,
#                    compute-sanitizer, the GPU bench, a summary (tools/gpu_check.py;
#                    DRY_RUN=1 plans and checks the setup without a GPU)
# On a machine whose python already has a CUDA torch with a visible GPU, the venv reuses
# it (SYSTEM_TORCH=1, detected); otherwise it installs the CPU torch 2.13.0.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_REQ   ?= torch==2.13.0
SYSTEM_TORCH ?= $(shell $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1 && echo 1 || echo 0)
MAX_JOBS    ?= 2
VPY         := $(VENV)/bin/python
DEPS_STAMP  := $(VENV)/.deps-installed

.PHONY: setup build build-test test bench bench-pytest cuda-check clean

$(VPY):
ifeq ($(SYSTEM_TORCH),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
else
	$(PYTHON) -m venv $(VENV)
endif

$(DEPS_STAMP): requirements-dev.txt | $(VPY)
	$(VPY) -m pip install --quiet --upgrade pip
ifneq ($(SYSTEM_TORCH),1)
	$(VPY) -m pip install --quiet "$(TORCH_REQ)"
endif
	$(VPY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(DEPS_STAMP)

# The release extension (what `pip install .` builds); build-test adds the test-only
# CUDA emulation extension (splinet_cuda._emulation) that the tests need.
build: setup
	MAX_JOBS=$(MAX_JOBS) $(VPY) -m pip install --quiet --no-build-isolation --no-deps -e .

build-test: setup
	SPLINET_EMULATION=1 MAX_JOBS=$(MAX_JOBS) $(VPY) -m pip install --quiet --no-build-isolation --no-deps -e .

cuda-check: setup
	$(VPY) tools/cuda_check.py

# Triton 3.6.0 (the GPU image's version) in its own directory, used only by triton-check;
# the tests run the installed Triton.
TRITON36    := build/triton36
$(TRITON36)/triton/__init__.py: | $(VPY)
	$(VPY) -m pip install --quiet --no-deps --target $(TRITON36) triton==3.6.0

.PHONY: triton-check
triton-check: setup $(TRITON36)/triton/__init__.py
	$(VPY) tools/triton_check.py --triton-path $(TRITON36)
	$(VPY) tools/triton_check.py --corners-only

# The documentation (docs/, Sphinx), read afresh each time (-E: an incremental build would not
# repeat the warnings of unchanged pages): warnings are errors (-W, all reported with --keep-going)
# and every cross-reference must resolve (-n). autodoc imports the package from the source
# tree; conf.py renders the newest bench/results file with bench.report.
DOCS_OUT    := build/docs
.PHONY: docs
docs: setup
	$(VPY) -m sphinx -E -W --keep-going -n -q -b html docs $(DOCS_OUT)
	@echo "docs: $(DOCS_OUT)/index.html"

test: build-test cuda-check triton-check docs
	$(MAKE) --no-print-directory gpu-check DRY_RUN=1 GPU_CHECK_PYTHON=$(VPY)
	SPLINET_REQUIRE_EMULATION=1 $(VPY) -m pytest tests -q
	$(MAKE) --no-print-directory sanitize
	$(MAKE) --no-print-directory racecheck

# AddressSanitizer + UndefinedBehaviorSanitizer + LeakSanitizer (tools/sanitize.py): its own
# build directory (build/sanitize/), the runtimes preloaded, any report fails the run.
# SANITIZE_TESTS=ci (every CPU kernel path, what `make test` runs) or all (every CPU test).
SANITIZE_TESTS ?= ci
.PHONY: sanitize fuzz
sanitize: setup
	MAX_JOBS=$(MAX_JOBS) $(VPY) tools/sanitize.py --tests $(SANITIZE_TESTS)

# ThreadSanitizer over the emulated CUDA block programs (tools/racecheck.py): the emulation
# extension alone built into build/tsan/ (about a minute), tests/test_races.py under the
# preloaded runtime; any report fails the run. It borrows the checkout's splinet_cuda._C
# (the CPU kernels the results are checked against), built here when missing.
.PHONY: racecheck
racecheck: setup
	@ls splinet_cuda/_C*.so >/dev/null 2>&1 || $(MAKE) --no-print-directory build-test
	MAX_JOBS=$(MAX_JOBS) $(VPY) tools/racecheck.py

# The property-based tests with hypothesis's long profile: fresh random examples, 5x the
# ci profile's (which `make test` runs with the rest of tests/).
fuzz: setup
	SPLINET_FUZZ_PROFILE=long SPLINET_REQUIRE_EMULATION=1 $(VPY) -m pytest tests/test_properties.py -q \
		-p no:cacheprovider --hypothesis-show-statistics

# No venv and no pip: the GPU machine's python3 already has a CUDA torch and the tools.
# GPU_CHECK_ARGS passes options on, e.g. GPU_CHECK_ARGS="--only build,selftest --out DIR".
GPU_CHECK_PYTHON ?= $(PYTHON)
.PHONY: gpu-check
gpu-check:
	$(GPU_CHECK_PYTHON) tools/gpu_check.py$(if $(filter 1 yes true,$(DRY_RUN)), --dry-run) $(GPU_CHECK_ARGS)

bench: build
	$(VPY) -m bench

bench-pytest: build
	$(VPY) -m pytest bench -q --benchmark-only --benchmark-columns=median,iqr,rounds --benchmark-sort=name

clean:
	rm -rf build *.egg-info splinet_cuda/*.so
