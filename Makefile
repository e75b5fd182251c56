# Two commands for a fresh machine (see README):
#   make demo   installs into .venv and runs the main job on the embedded default
#   make test   installs into .venv and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

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

clean:
	rm -rf $(VENV) runs
