# layerfs: fresh-machine setup, demo, tests and benchmarks.
# Quick start on a fresh Debian/Ubuntu machine, as root:  make demo  &&  make test
#
#   make setup   install what is missing (apt packages, .venv, pip install -e '.[test]')
#   make demo    setup + scripts/demo.sh (sample busybox image on an overlay2 store via the CLI)
#   make test    setup, then the VM step (tests/vm/run.py: pytest -m vm inside a QEMU TCG VM
#                booting a stock Debian kernel, for device-mapper and quotas), then the host
#                pytest LAST (its closing summary line is the last line printed; CI reads it).
#                Fails when either step fails; "no tests collected" (pytest exit 5) counts
#                as a failure; so does a VM that cannot boot.  Junit of the VM step:
#                build/junit-vm.xml
#   make bench   setup + pip install -e '.[bench]' (matplotlib) + python -m benchmarks run
#   make clean   remove the demo store and build/
#
# Extra arguments: make test PYTEST_ARGS='-k overlay -x'   make bench BENCH_ARGS=--quick
#                  make test VM_ARGS='-- -k dm -x'   (tests/vm/run.py options, then pytest's)

SHELL := /bin/bash
PYTHON := .venv/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=
VM_ARGS ?=

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@vm=0; $(PYTHON) tests/vm/run.py --marker vm --junit build/junit-vm.xml $(VM_ARGS) || vm=$$?; \
	if [ $$vm -ne 0 ]; then \
		echo "make test: the VM step failed (exit $$vm); running the host tests, then failing" >&2; \
	fi; \
	rc=0; $(PYTHON) -m pytest -q tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then rc=1; fi; \
	if [ $$vm -ne 0 ] && [ $$rc -eq 0 ]; then rc=1; fi; \
	exit $$rc

bench: setup
	$(PYTHON) -m pip install -q -e '.[bench]'
	$(PYTHON) -m benchmarks run $(BENCH_ARGS)

clean:
	@bash scripts/demo.sh --clean
	rm -rf build
