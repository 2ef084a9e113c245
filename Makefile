# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: PyPI's build (with CUDA on Linux x86-64), or a local wheel where pip is configured with one;
# TORCH="..." picks another build.
TORCH ?= torch==2.13.0

.PHONY: demo test bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

# Two test processes, one OpenMP thread each: the tests' training processes spend much of their time
# starting up, so two at once use the cores better; more than one OpenMP thread per process would then
# oversubscribe the cores, which slows torch's spinning threads many times over (measured on 2 cores).
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS)

bench: $(VENV)/.installed
	$(PY) benchmarks/loader_speed.py

clean-venv:
	rm -rf $(VENV)
