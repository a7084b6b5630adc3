# Two commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench-resnet clean zoo

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,plots,transformers,lightning]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hwprune demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

test: $(STAMP) lint
	$(BIN)/python -m pytest

# torchvision models and the Torch-Pruning peer, apart: torchvision needs torch 2.14.1
ZOO := .venv-zoo
$(ZOO)/.installed: pyproject.toml
	test -d $(ZOO) || $(PYTHON) -m venv $(ZOO)
	$(ZOO)/bin/python -m pip install --quiet --upgrade pip
	$(ZOO)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(ZOO)/bin/python -m pip install --quiet -e ".[zoo,onnx,onnxruntime]"
	touch $(ZOO)/.installed

zoo: $(ZOO)/.installed

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
