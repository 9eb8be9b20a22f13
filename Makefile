# The README's two commands: `make demo` (set up, prep the debug shards, train demo-long-cpu on 2
# CPU processes) and `make test`. Everything installs into .venv at the versions the suite passed
# with (constraints.txt); torch comes first and pinned, then DeepSpeed without build isolation, or
# either would pull a multi-GB CUDA torch.
PYTHON ?= python3
# Never the checkout root on sys.path (`python -m` puts the working directory first): its kernels/,
# data/ and models/ would shadow installed packages of those names. Every Python started below
# inherits it: pytest, the processes the tests start, torchrun's ranks.
export PYTHONSAFEPATH := 1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ithaca-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt packaging ninja psutil
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation -e '.[test]'
	touch $(STAMP)

runs/debug-data/manifest.json: $(STAMP)
	$(BIN)/ithaca prep --output runs/debug-data --shard-tokens 1000000

demo: runs/debug-data/manifest.json
	$(BIN)/ithaca train --config configs/demo-long-cpu.yaml

# Two workers, each test file whole on one (its module fixtures, such as the SLURM and namespace
# clusters, are built once): half the suite's time waits on processes starting, servers and
# timeouts, so two workers on two cores finish it in about half the time.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs
