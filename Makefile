VENV ?= .venv

.PHONY: setup run test bench

setup:
	bash experiments/setup.sh

run: setup
	$(VENV)/bin/onpolicy-sft loop --config experiments/configs/cpu_default.yaml

test: setup
	$(VENV)/bin/python -m pytest -q

BENCHMARKS = objectives_bench ddt_bench train_bench vllm_weight_swap decoding_bench decoding_length_bench packing_bench grading_bench arith_baseline

bench: setup
	for b in $(BENCHMARKS); do $(VENV)/bin/python experiments/benchmarks/$$b.py || exit 1; done
