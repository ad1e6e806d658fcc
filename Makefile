# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Known-good PyTorch pins; pyproject.toml declares ranges.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PINS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/histosynth demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output
