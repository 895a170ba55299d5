# Two entry points, each installing what it needs into a local virtual environment (.venv):
#   make demo       the main job on the shipped model: prune it, print the circuit, check it (~1 min on a CPU)
#   make test       the test suite (Triton kernels run in the interpreter when there is no GPU)
#   make selfcheck  every op against its reference, plus the GPU build report
#   make docs       the documentation site (docs/, mkdocs.yml) into site/, with --strict: a broken link or a renamed
#                   API object fails
#   make gpu-check  the prepared GPU proof (scripts/gpu_check.py): tests, selfcheck, benchmarks, one summary table;
#                   runs with the machine's own $(PYTHON) from the working tree (no .venv, nothing installed)
# The torch requirement is overridable: CI pins the CPU build with the default below; on a GPU machine,
# e.g. `make test TORCH="torch"` or point VENV at an environment that already has a CUDA torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test selfcheck docs gpu-check install clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/nodeprune demo

selfcheck: $(BIN)/.installed
	$(BIN)/nodeprune selfcheck

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

$(BIN)/.docs-installed: $(BIN)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e ".[docs]"
	touch $@

docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

# GPU_CHECK_ARGS: e.g. --small (the CPU smoke mode), --skip fit, --budget 600
gpu-check:
	PYTHONPATH=. $(PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache site
