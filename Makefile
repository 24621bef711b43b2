# make demo   set up .venv and run the built-in demo (writes under demo/)
# make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: venv demo test bench

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) demo.py

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/bench_prepare.py
	$(PY) benchmarks/bench_engine.py
