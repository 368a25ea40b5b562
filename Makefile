# authd: every target works on a fresh Debian 12 machine, as root, with nothing installed by hand.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BUILD  := build

# Debian packages the tests, the demo and the build need; installed only when missing.
APT_PACKAGES := iproute2 clang-14 llvm-14 libbpf-dev libbpf1 bpftool linux-libc-dev iperf3 containernetworking-plugins \
	systemd systemd-container debootstrap prometheus etcd-server qemu-system-x86 busybox-static cpio kmod wireguard-tools wireguard-go

.PHONY: all test lint typecheck bench demo clean distclean system-deps venv artifacts wheel-check

all: venv

# Generated files shipped inside the package; also built by hatch_build.py for pip install / pip wheel.
artifacts: protos
	$(MAKE) --no-print-directory -C bpf

# Protobuf modules and their type stubs for the SPIRE and etcd APIs, the node channel and Hubble's
# Observer API (*/_proto, gitignored). hatch_build.py passes the build environment's Python on the command
# line; otherwise the project venv's is used.
PROTO_DIRS := authd/spire/_proto authd/cluster/_proto authd/attest/_proto authd/hubble/_proto
PROTO_SRC := $(foreach dir,$(PROTO_DIRS),$(wildcard $(dir)/*.proto))
PROTO_GEN := $(PROTO_SRC:.proto=_pb2.py)
ifeq ($(origin PYTHON),command line)
PROTOC_PYTHON := $(PYTHON)
else
PROTOC_PYTHON := $(PY)
endif

.PHONY: protos
protos: $(PROTO_GEN)

%_pb2.py: %.proto $(PROTO_SRC)
	PATH="$(dir $(abspath $(PROTOC_PYTHON))):$$PATH" $(PROTOC_PYTHON) -m grpc_tools.protoc -I . --python_out=. --mypy_out=. $<

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: system-deps $(VENV)/.installed artifacts

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

test: lint typecheck wheel-check
	$(VENV)/bin/pytest

# What `pip install .` builds: the wheel must carry the BPF object, the protobuf modules, the unit and the
# docs, and work from a fresh venv that holds only it and its dependencies (docs/install.md's /opt/authd).
WHEEL_DIR := $(BUILD)/wheel
WHEEL_MUST_HOLD := authd/datapath/authd.bpf.o authd/spire/_proto/workload_pb2.py \
	authd/spire/_proto/delegatedidentity_pb2.py authd/spire/_proto/entry_pb2.py authd/cluster/_proto/etcd_pb2.py \
	authd/attest/_proto/channel_pb2.py \
	authd/hubble/_proto/flow_pb2.py authd/hubble/_proto/observer_pb2.py \
	authd-$$v.data/data/share/authd/systemd/authd.service authd-$$v.data/data/share/doc/authd/install.md
wheel-check: venv
	rm -rf $(WHEEL_DIR)
	$(PY) -m pip wheel -q --no-deps -w $(WHEEL_DIR) .
	@v=$$($(PY) -c 'import authd; print(authd.__version__)'); listing=$$($(PY) -m zipfile -l $(WHEEL_DIR)/authd-*.whl); \
	for f in $(WHEEL_MUST_HOLD); do echo "$$listing" | grep -q " *$$f " || { echo "wheel lacks $$f"; exit 1; }; done
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/pip install -q $(WHEEL_DIR)/authd-*.whl
	cd $(WHEEL_DIR) && venv/bin/authd --help >/dev/null && venv/bin/authd version
	cd $(WHEEL_DIR) && echo '{"cniVersion":"1.0.0"}' | CNI_COMMAND=VERSION venv/bin/authd-cni | grep -q supportedVersions
	cd $(WHEEL_DIR) && venv/bin/python -c 'import authd.daemon; from authd.datapath.loader import object_path; \
		assert object_path().is_file(), object_path()'
	test -f $(WHEEL_DIR)/venv/share/authd/systemd/authd.service

bench: venv
	mkdir -p $(BUILD)
	$(PY) -m bench --output $(BUILD)/bench.json

# A two-node cluster on this machine, narrated (authd/devcluster/demo.py); as root, under two minutes.
demo: venv
	$(PY) -m authd.devcluster.demo

clean:
	rm -rf $(BUILD) dist .pytest_cache .mypy_cache .ruff_cache
	rm -f $(foreach dir,$(PROTO_DIRS),$(dir)/*_pb2.py $(dir)/*_pb2.pyi)
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
