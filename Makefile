# leanmoe: `make test` runs the suite, `make demo` runs the main job. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The exact pin matters on build machines: pip takes the CPU wheel kept on disk for it. On a
# user's machine the same pin resolves to PyPI's default build (CUDA on Linux x86_64).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/leanmoe train

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
