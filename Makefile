# Two commands do all the set-up: `make demo` and `make test` each build the
# virtual environment they need (.venv) and then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test figures step bench lessons clean

$(BIN)/flashnumba: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,cu13]'
	touch $@

demo: $(BIN)/flashnumba
	$(BIN)/flashnumba demo

test: $(BIN)/flashnumba
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

figures: $(BIN)/flashnumba
	$(BIN)/flashnumba figures

step: $(BIN)/flashnumba
	$(BIN)/flashnumba step

bench: $(BIN)/flashnumba
	$(BIN)/flashnumba bench

# the course: JupyterLab on lessons/ (see lessons/README.md)
lessons: $(BIN)/flashnumba
	$(BIN)/pip install -q -e '.[lessons]'
	$(BIN)/jupyter lab lessons

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
