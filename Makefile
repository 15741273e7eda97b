# nas4dyn: `make demo` runs the whole pipeline on Fashion-MNIST; `make test` runs the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= demo_out

.PHONY: demo test install data clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; nothing is downloaded at run time.
data:
	@if [ ! -f $(DATA_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	  else \
	    echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or pass --data-root" >&2; exit 2; \
	  fi; \
	fi

demo: install data
	$(BIN)/python scripts/demo.py --out $(DEMO_DIR)

test: install data
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
