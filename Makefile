# Two commands for a fresh machine (see README):
#   make demo   installs into .venv and runs the main job on the embedded default
#   make test   installs into .venv and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean bench-memory bench-quality bench-federated bench-scale

# torch is pinned FIRST: 2.13.0 is the CPU wheel on disk; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedzoodip simulate

test: $(STAMP)
	$(PY) -m pytest -q

# Benchmarks write JSON + a markdown table to benchmarks/results/ (run as scripts: opacus ships
# a top-level `benchmarks` package of its own, so `python -m benchmarks.x` would find the wrong one).
bench-memory: $(STAMP)
	$(PY) benchmarks/memory.py

bench-quality: $(STAMP)
	$(PY) benchmarks/quality.py

bench-federated: $(STAMP)
	$(PY) benchmarks/federated.py

bench-scale: $(STAMP)
	$(PY) benchmarks/scale.py

clean:
	rm -rf $(VENV) runs
