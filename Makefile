# lmrunner developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bootstrap lint typecheck test-host test-v2 test-systemd images image bench clean

## test: bootstrap, ruff, mypy --strict, pytest on the host, then the cgroup-v2 tests in a guest
## and the systemd-host tests in the modern-host test bed
test: bootstrap lint typecheck test-host test-v2 test-systemd

## demo: bootstrap, then a factory on examples/demo.yaml with `lmrunner ps` while LMs run
demo: bootstrap
	scripts/demo

## bootstrap: install and start the engines, build vcbusybox, make the venv (idempotent)
bootstrap:
	scripts/bootstrap

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	bash -n scripts/bootstrap scripts/install-apptainer scripts/test-v2-guest scripts/typecheck \
	  scripts/build-image scripts/demo images/vcbusybox/build scripts/build-systemd-guest \
	  scripts/test-systemd-guest
	sh -n images/vcbusybox/init

typecheck:
	scripts/typecheck

## test-host: unit, contract and integration tests (docker, apptainer, qemu, cgroup_v1) here
test-host:
	$(PY) -m pytest -m "not cgroup_v2 and not systemd_host" tests

## test-v2: inside a virtme-ng guest (Debian kernel, TCG, pure cgroup v2): the cgroup_v2 tests
## and the Apptainer contract suite (the apptainer-marked tests of tests/contract)
test-v2:
	scripts/test-v2-guest

## test-systemd: the systemd_host tests in a full Debian 12 guest (systemd as PID 1, pure cgroup
## v2, dockerd at its systemd cgroup driver, lmrunner installed from its wheel); TCG here
test-systemd:
	scripts/test-systemd-guest

## images: (re)build vcbusybox in its three formats
images:
	images/vcbusybox/build all

## image: the lmrunner factory image from the top-level Dockerfile
image:
	scripts/build-image

## bench: the benchmarks (figures as JSON on the last line of each)
bench:
	$(PY) bench/core.py
	$(PY) bench/start_latency.py --backend docker
	$(PY) bench/start_latency.py --backend apptainer
	$(PY) bench/start_latency.py --backend vm --repeat 5
	$(PY) bench/accounting.py --backend docker
	$(PY) bench/accounting.py --backend apptainer
	$(PY) bench/accounting.py --backend vm --repeat 1

clean:
	rm -rf build .cache .pytest_cache .mypy_cache .ruff_cache
