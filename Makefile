# Two entry points for a fresh machine: `make demo` and `make test`. Both install what is missing first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
MXNET_BUILD ?= cpu
# Offline and private by default: no analytics from Prefect or Great Expectations.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: install system test demo demo-stop bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml uv.lock scripts/install.sh scripts/build-horovod.sh $(wildcard scripts/patches/*.patch)
	MXNET_BUILD=$(MXNET_BUILD) bash scripts/install.sh
	touch $@

system:
	bash scripts/install-system.sh

# Skips show with their reason (-ra); RN50_STRICT=1 in the environment (.ci/run sets it) makes them failures.
test: install system
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 tests

demo: install
	bash scripts/demo.sh

demo-stop:
	bash scripts/demo.sh stop

# Benchmarks (ratios against a baseline measured in the same run); figures go in the README.
bench: install
	$(PY) -m bench.pack
	$(PY) -m bench.data_path
	$(PY) bench/train_dataloader.py
	$(PY) bench/cached_flow.py

clean:
	rm -rf $(VENV) .demo
