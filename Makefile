# faceid: two commands on a fresh machine.
#   make demo   install everything, then run the training pipeline locally on the sample identity
#   make test   install everything, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FACEID := $(VENV)/bin/faceid
STAMP := $(VENV)/.faceid-installed

.PHONY: install demo test repro infer compile bench bench-gpu clean

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
	$(VENV)/bin/pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

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
	for b in bench_faces bench_pose bench_train_tiny; do $(PY) benchmarks/$$b.py || exit 1; done

bench-gpu: install
	$(PY) benchmarks/bench_train_gpu.py --steps 10 --frames 81 33

clean:
	rm -rf .kfp mlruns .ray_results data/work
