# The two commands: `make demo` and `make test`. Both set up what is missing first.
SHELL := /bin/bash
VENV := .venv/bin
NP ?= 4
ROOT_MPI := $(if $(filter 0,$(shell id -u)),OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1,)

.PHONY: setup demo test test-fast bench clean

setup:
	@tools/setup.sh

demo: setup
	@$(ROOT_MPI) PATH=$(CURDIR)/$(VENV):$$PATH launch/demo.sh $(NP)

test: setup
	@$(ROOT_MPI) PATH=$(CURDIR)/$(VENV):$$PATH tools/test.sh

test-fast: setup
	@PATH=$(CURDIR)/$(VENV):$$PATH $(VENV)/python -m pytest -q -m "not slow"

bench: setup
	@PATH=$(CURDIR)/$(VENV):$$PATH $(VENV)/fa-hvd-bench aggregators

clean:
	rm -rf .venv build *.egg-info
