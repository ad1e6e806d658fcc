# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Known-good PyTorch pins; pyproject.toml declares ranges.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean demo-weights

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PINS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/histosynth demo --out demo-output

# Every test, the 10 slowest listed. Statistical claims about trained models are benchmarks/, not tests.
test: $(STAMP)
	$(PY) -m pytest -q --durations=10

clean:
	rm -rf $(VENV) demo-output

# Reproduce the bundled demo weights from configs/demo/ (45 min on 2 CPU cores: mask model and autoencoder side by
# side 21 min, then the image model 20-24 min).
demo-data/dataset: $(STAMP)
	$(VENV)/bin/histosynth prepare histosynth/data/samples/cmu_small_region.svs --out demo-data/dataset \
		--mpp 0.5 --patch 128 --stride 64 --auto-labels --label-fraction 0.5 --seed 0

demo-weights: demo-data/dataset
	rm -rf histosynth/weights/demo histosynth/weights/demo/*.train
	OMP_NUM_THREADS=1 $(VENV)/bin/histosynth train mask --config configs/demo/mask.yaml & \
	OMP_NUM_THREADS=1 $(VENV)/bin/histosynth train autoencoder --config configs/demo/autoencoder.yaml && \
	$(VENV)/bin/histosynth train image --config configs/demo/image.yaml && wait
