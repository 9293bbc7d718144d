# Two commands: `make run` starts a node, `make test` runs every test. Both set up what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint bench setup toolchains test-tools sdk clean

# Debian packages the runtimes need: node (nodejs runtime), go and rustc (their builds). A rustup Rust in
# ~/.cargo/bin counts as installed (the node finds it there too); Debian's rustc is the fallback.
# e2fsprogs and debootstrap: Firecracker guest images (nimbus images build, and their tests).
DEB_TOOLS := node:nodejs go:golang-go rustc:rustc mkfs.ext4:e2fsprogs debugfs:e2fsprogs debootstrap:debootstrap

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

toolchains:
	@missing=""; for pair in $(DEB_TOOLS); do command -v $${pair%%:*} >/dev/null || test -x "$$HOME/.cargo/bin/$${pair%%:*}" || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing$$missing (runtime toolchains)"; apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
		else echo "note: not installed:$$missing (their runtimes will be unavailable; see nimbus doctor)"; fi; \
	fi

# Debian's chromium, for the test that opens a function's page in a browser (Playwright drives it; its own
# browser download cannot work here), and Debian's haproxy, for the cluster's routing tests (the load balancer
# `nimbus cluster haproxy-config` configures). Without root the tests that need them say they are skipped.
TEST_TOOLS := chromium:chromium haproxy:haproxy

test-tools:
	@missing=""; for pair in $(TEST_TOOLS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing$$missing (test tools)"; apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
		else echo "note: not installed:$$missing (the tests that need them will be skipped)"; fi; \
	fi

# axe-core (npm), the accessibility rules the console's browser tests run in every page: fetched once into the
# venv. Without npm the test that needs it says it is skipped.
AXE_VERSION := 4.14.1
AXE_DIR := $(VENV)/axe-core-$(AXE_VERSION)

$(AXE_DIR)/axe.min.js: | $(STAMP)
	@mkdir -p $(AXE_DIR); \
	if command -v npm >/dev/null && (cd $(AXE_DIR) && npm pack --silent axe-core@$(AXE_VERSION) >/dev/null); then \
		tar xzf $(AXE_DIR)/axe-core-$(AXE_VERSION).tgz -C $(AXE_DIR) --strip-components=1 package/axe.min.js package/LICENSE; \
		rm -f $(AXE_DIR)/axe-core-$(AXE_VERSION).tgz; \
	else echo "note: could not fetch axe-core $(AXE_VERSION) with npm (the console's accessibility test will be skipped)"; fi

# The AWS SDK python3 and nodejs machines get, built once per host (NIMBUS_SDK_CACHE) from PyPI and npm.
sdk: $(STAMP) toolchains
	$(VENV)/bin/nimbus sdk

run: $(STAMP) toolchains sdk
	$(VENV)/bin/nimbus up

test: $(STAMP) toolchains test-tools $(AXE_DIR)/axe.min.js lint sdk
	$(PY) -m pytest -q -p no:cacheprovider

# Lint and types as habits: ruff over everything, mypy where [tool.mypy] says (both configured in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

# wrk (Debian's package) measures the load rows of issue 24; haproxy (also Debian's) balances the rows that
# run a cluster. Without them (and without root) those rows say so.
BENCH_TOOLS := wrk:wrk haproxy:haproxy

bench: $(STAMP)
	@missing=""; for pair in $(BENCH_TOOLS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing$$missing (bench tools)"; apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
		else echo "note: not installed:$$missing (the rows that need them will say so)"; fi; \
	fi
	$(PY) -m bench

clean:
	rm -rf $(VENV) .nimbus
