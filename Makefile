# Two entry points for a fresh clone: `make demo` and `make test`.
# Each creates the virtual environment in .venv when it is missing and
# installs the tested versions pinned in constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.facets-installed

.PHONY: setup demo test clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m benchmarks.subset_search

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-cache:
	rm -rf cache out
