# Sieve: two commands do all the set-up.  `make demo` and `make test`.
# Both create .venv when missing and (re)install only when pyproject.toml changed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,dev
comma := ,
# one stamp per set of extras: `make demo` then `make test EXTRAS=cpu,dev,ui-test` installs the extra
STAMP := $(VENV)/.sieve-installed-$(subst $(comma),-,$(EXTRAS))
DEMO ?= demo
PYTEST_ARGS ?=

.PHONY: install demo test lint format bench clean-demo

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat mode: a plain .pth path, so worktrees and `streamlit run` import the checkout.
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' --config-settings editable_mode=compat
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# rewrites the tree: the formatter, then the linter's safe fixes
format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	DEMO=$(DEMO) PY=$(PY) bash scripts/demo.sh

# Every benchmark, each writing bench/results/NAME.json, then the README's figure table.
# Hours on 2 cores; bench.server, bench.guidance and bench.webui measure the demo's collection and HDiT (run `make demo` first).
bench: $(STAMP)
	$(PY) -m bench.clip_tiny
	$(PY) -m bench.watermark
	OMP_NUM_THREADS=1 taskset -c 0 $(PY) -m bench.embed_stages
	$(PY) -m bench.embed
	$(PY) -m bench.index
	$(PY) -m bench.server --collection $(DEMO)/collection
	$(PY) -m bench.hdit --only scaling,flops,throughput,demo
	$(PY) -m bench.curation
	$(PY) -m bench.security
	$(PY) -m bench.insight
	$(PY) -m bench.guidance --hdit-run $(DEMO)/hdit --collection $(DEMO)/collection
	$(PY) -m bench.webui --demo $(DEMO)/collection
	$(PY) -m bench.sql_remote
	$(PY) -m bench.storage
	$(PY) -m bench.figures --write

clean-demo:
	rm -rf $(DEMO)
