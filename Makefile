# Two commands from a fresh clone: `make demo` trains the README's demo, `make test` runs the tests.
# Each creates the virtual environment $(VENV) on first use; pip runs again only when requirements*.txt change
# (the stamp files below), so the second call goes straight to the work. `.ci/run` is `make test VENV=.venv-ci`.
VENV ?= .venv
# The tests start slurm scripts that read VENV from the environment; make's own setting must not reach them.
unexport VENV
PYTHON ?= python3

.PHONY: demo test gpu-check

demo: $(VENV)/.installed
	$(VENV)/bin/torchrun --nproc_per_node=2 train.py --encoder resnet10t --data synthetic --synthetic-count 256 \
		--synthetic-size 128 --work-size 128 --img-size 64 --batch-size 16 --lr 0.05 --epochs 78 --select last

test: $(VENV)/.installed-dev
	$(VENV)/bin/python -m pytest -q tests

# On a machine with one GPU: tests/test_gpu.py (skipped without CUDA), figures appended to $(GPU_CHECK_OUT).
# Uses the venv when there is one, else the machine's python3 (a GPU image with torch and timm installed).
GPU_CHECK_OUT ?= gpu-check.jsonl
gpu-check:
	GPU_CHECK_OUT=$(abspath $(GPU_CHECK_OUT)) $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3) \
		-m pytest -q -s -p no:cacheprovider tests/test_gpu.py

$(VENV)/.installed: requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(VENV)/bin/python -m pip install -r requirements-dev.txt
	touch $@
