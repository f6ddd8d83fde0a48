# cdm: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU build of torch lies on these machines' disk; a looser pin pulls a multi-GB CUDA build.
# GPU users: install your own torch into $(VENV) first, `make install` keeps it.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install postgres test test-slow demo demo-text bench bench-lora bench-memorization bench-lr bench-text bench-sweep bench-cli clean

install: $(STAMP)

# torch through pip (it finds the CPU build on this disk; uv does not look there), then everything else through uv,
# pinned, from constraints.txt, compiled to bytecode as pip does: 48 s instead of pip's 1 min 53 s here, uv's cache empty. uv
# keeps the torch it finds.
UV     := uv==0.13.10
# `make test` runs the suite on this many pytest-xdist workers (one torch thread each, tests/conftest.py); each
# worker takes whole modules (`--dist loadscope`), so a module's fixtures are built once.
# JOBS=0: one process, no workers.
JOBS   ?= 2

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q $(UV)
	$(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: install postgres
	$(PY) -m pytest -q -n $(JOBS) --dist loadscope

# The stack's tests (`cdm stack up`) need Debian's PostgreSQL server; these machines have it, others get it here.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }

test-slow: install postgres
	$(PY) -m pytest -q -m slow

demo: install
	rm -rf demo-workspace demo-workspace.sources
	$(VENV)/bin/cdm demo --quick --out demo-workspace

# The text-to-image story (captioned coloured digits, LoRA compartments, prompts, a revocation): ~6 min on 2 cores.
demo-text: install
	rm -rf demo-text-workspace demo-text-workspace.sources
	$(VENV)/bin/cdm demo --text --out demo-text-workspace

# Benchmark v4: text-to-image compartments, 3 seeds x 2 partitions: bench/text.json and bench/TEXT.md.
bench-text: install
	$(PY) bench/text.py

# Benchmark v3's headline: full fine-tunes, 8 seeds (each its own partition) x 2 paired sample sets per model:
# bench/regime.json (its `headline` object) and bench/REGIME.md. ~11 min a seed on 2 cores, ~100 min in all with the
# base's pretraining (`--base-cache FILE` keeps the base for reruns; `--finish` reports an interrupted run's seeds).
bench: install
	$(PY) bench/regime.py

# LoRA compartments, and memorization / membership / forgetting: their own targets (not the headline's evidence).
bench-lora: install
	$(PY) bench/regime.py --kinds lora --seeds 0 1 2 --out-name lora
bench-memorization: install
	$(PY) bench/memorization.py

# How long commands take as new processes on the embedded default (bench/cli.json, ~5 min).
bench-cli: install
	$(PY) bench/cli.py

# The learning-rate rule's sweep (bench/lr_sweep.json), and the equal-compute budget sweep.
bench-lr: install
	$(PY) bench/regime.py --lr-sweep --shard-cap 1200
bench-sweep: install
	$(PY) bench/regime.py --regimes equal --kinds scratch full lora --budgets 400 1600 --out-name sweep

clean:
	rm -rf $(VENV) demo-workspace demo-workspace.sources demo-text-workspace demo-text-workspace.sources .pytest_cache
