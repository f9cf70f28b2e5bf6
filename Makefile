# One entry point for people and CI. `make demo` sets everything up and runs the main job on the
# CPU; `make test` runs the whole test suite (what .ci/run runs).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU wheel of torch; any other torch requirement pulls GBs of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast lint bench clean

install:
	@$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" 2>/dev/null \
		|| $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	# The peers (other SOAPs) for the main job and the suite's peer smoke tests; --no-deps keeps the
	# CPU torch (HeavyBall imports numpy; opt-einsum only in its set_torch(), not called).
	$(PIP) install -q --no-deps heavyball==3.2.1 pytorch-optimizer==4.1.0 numpy

demo: install
	$(PYTHON) python/train_lm.py

test: install
	bash .ci/tests.sh

lint:
	ruff check soap_kernels tests benchmarks python setup.py

bench: install
	$(PYTHON) benchmarks/bench_step.py

clean:
	rm -rf build *.egg-info soap_kernels/*.so .pytest_cache
