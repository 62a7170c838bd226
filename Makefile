# Two commands do all the setup on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch==2.13.0 is a CPU wheel on this project's machines; a bare `torch` would pull a multi-GB
# CUDA build. GPU users: see README ("Installing on a GPU machine").
TORCH  ?= torch==2.13.0
DEMO_OUT ?= demo_out
LEVERS_OUT ?= levers_out

DEMO_FAMILIES_OUT ?= demo_families_out

.PHONY: install test lint demo demo-families levers clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(VENV)/bin/python -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/clipseg-bench demo --out $(DEMO_OUT)

# The demo with a tiny SAM 3 beside the tiny CLIPSeg (issue 23): about 30 minutes on 2 busy cores,
# so not part of `make demo` (README "The demo").
demo-families: $(STAMP)
	$(VENV)/bin/clipseg-bench demo --families --out $(DEMO_FAMILIES_OUT)

# The issue-14 study (input channels x 3D clean-up, 3 seeds): about an hour on 2 busy cores, so not
# part of `make demo`. README "Quality levers" has the table it produced.
levers: $(STAMP)
	$(PY) benchmarks/levers.py --out $(LEVERS_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_FAMILIES_OUT) $(LEVERS_OUT) .pytest_cache
