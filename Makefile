# Two commands for a fresh machine (see README):
#   make demo   installs into .venv and runs the main job on the embedded default
#   make test   installs into .venv and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean bench-memory bench-quality bench-quality-sg bench-federated bench-scale

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

# The recorded quality run (benchmarks/results/quality.md): an uneven grid run in parts (finished
# cells are reused), then one report. About 2.5 h on one core; two parts at a time fit 2 cores.
QUALITY = $(PY) benchmarks/quality.py --budget 3000 --eval-points 3 --n-images 12
ALL_CONCEPTS = lagoon tidepool glacier ember verdigris grape mosaic chessboard harlequin
bench-quality: $(STAMP)
	$(QUALITY) --concepts $(ALL_CONCEPTS) --seeds 0
	$(QUALITY) --concepts lagoon glacier ember tidepool --seeds 1
	$(QUALITY) --concepts lagoon glacier --seeds 2
	$(QUALITY) --concepts lagoon --seeds 0 --precisions int8 int4
	$(QUALITY) --concepts $(ALL_CONCEPTS) --seeds 0 1 2 --precisions fp32 int8 int4 --report-only

# ZOODiP with the engine's default SG buffer at D = 64 (tau 16) beside the grid above (tau 128).
TAU16 = $(QUALITY) --methods zoodip --tau 16 --out benchmarks/results/quality-sg-tau16.json
bench-quality-sg: $(STAMP)
	$(TAU16) --concepts lagoon glacier tidepool --seeds 0 1 2
	$(TAU16) --concepts lagoon --seeds 0 1 2 --precisions int8 int4 --jobs 2
	$(TAU16) --concepts lagoon glacier tidepool --seeds 0 1 2 --precisions fp32 int8 int4 --report-only

bench-federated: $(STAMP)  # the recorded run (benchmarks/results/federated.md); about 32 min on 1 core
	$(PY) benchmarks/federated.py --metric cosine --thresholds 0.7 0.75 0.8 --seeds 0 1 \
	    --veterans 3 --newcomers 3 --fleet-rounds 3 --fleet-steps 300 --probe-steps 20 --steps 600 \
	    --eval-every 100 --images 12 --stat-source updates --out benchmarks/results/federated

bench-scale: $(STAMP)
	$(PY) benchmarks/scale.py

clean:
	rm -rf $(VENV) runs
