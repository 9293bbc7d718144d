# Two commands: `make run` starts a node, `make test` runs every test. Both set up what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test bench setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nimbus up

test: $(STAMP)
	@command -v node >/dev/null || { echo "installing nodejs (needed by the nodejs runtime tests)"; apt-get update -qq && apt-get install -y -qq nodejs >/dev/null; }
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .nimbus
