# Two commands do all the set-up: `make demo` and `make test` each build the
# virtual environment they need (.venv) and then run. Each install runs once
# (a stamp file in .venv records it) and again only when pyproject.toml changes.
#
#   make demo   the core package (numba, numpy, matplotlib: no torch, no Jupyter);
#               on a machine where nvidia-smi finds a GPU also the `cu13` extra
#               (NVIDIA's compiler wheels), which the GPU needs and the simulator not
#   make test   adds the `dev` extra (pytest, torch's CPU build, notebook runners) and
#               `cu13` (the resource check compiles for real GPUs, with or without one)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
GPU    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
CORE   := $(if $(GPU),.[cu13],.)

.PHONY: demo test figures step bench lessons clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '$(CORE)'
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(BIN)/pip install -q -e '.[dev,cu13]'
	touch $@

$(VENV)/.lessons: $(VENV)/.core
	$(BIN)/pip install -q -e '.[lessons,torch]'
	touch $@

demo: $(VENV)/.core
	$(BIN)/flashnumba demo

# --dist load: tests go to whichever worker is free (pytest 9 ignores pytest-xdist 3.8's
# xdist_group marks; loadfile leaves one worker idle at the end). The resource build is shared
# through a file lock (tests/test_resources.py).
test: $(VENV)/.dev
	$(BIN)/python -m pytest -n 2 --dist load -q

figures: $(VENV)/.core
	$(BIN)/flashnumba figures

step: $(VENV)/.core
	$(BIN)/flashnumba step

bench: $(VENV)/.dev
	$(BIN)/flashnumba bench

# the course: JupyterLab on lessons/ (see lessons/README.md), with torch for lesson 15
lessons: $(VENV)/.lessons
	$(BIN)/jupyter lab lessons

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
