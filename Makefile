# layerfs: fresh-machine setup, demo, tests and benchmarks.
# Quick start on a fresh Debian/Ubuntu machine, as root:  make demo  &&  make test
#
#   make setup   install what is missing (apt packages, .venv, pip install -e '.[test]')
#   make demo    setup + scripts/demo.sh (sample busybox image on an overlay2 store via the CLI)
#   make test    setup + pytest; "no tests collected" (pytest exit 5) counts as a failure
#   make bench   setup + python -m benchmarks run
#   make clean   remove the demo store and build/
#
# Extra arguments: make test PYTEST_ARGS='-k overlay -x'   make bench BENCH_ARGS=--quick

SHELL := /bin/bash
PYTHON := .venv/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@rc=0; $(PYTHON) -m pytest -q tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
		echo "make test: pytest collected no tests (exit 5); treating that as a failure" >&2; \
		exit 1; \
	fi; \
	exit $$rc

bench: setup
	$(PYTHON) -m benchmarks run $(BENCH_ARGS)

clean:
	@bash scripts/demo.sh --clean
	rm -rf build
