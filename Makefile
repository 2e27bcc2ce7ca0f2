VENV ?= .venv

.PHONY: setup run test bench

setup:
	bash experiments/setup.sh

run: setup
	$(VENV)/bin/onpolicy-sft loop --config experiments/configs/cpu_default.yaml

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python experiments/benchmarks/run_all.py
