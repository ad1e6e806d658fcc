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

# Reproduce the bundled demo weights from configs/demo/ (a few hours on 2 CPU cores: the autoencoder and the mask
# model side by side, then the image model). Every stage resumes from its last checkpoint when run again.
demo-data/dataset: $(STAMP)
	$(VENV)/bin/histosynth prepare histosynth/data/samples/cmu_small_region.svs --out demo-data/dataset \
		--mpp 0.5 --patch 128 --stride 64 --auto-labels regions --label-fraction 0.5 --seed 0

# The image model also sees patches with as little as 10 % tissue: with only the >= 50 % tissue patches above,
# background is 8 % of its mask pixels, all at tissue borders, and it painted loose tissue where a layout puts
# background (the mask model draws 40 % background, as the slide has).
demo-data/image-dataset: $(STAMP)
	$(VENV)/bin/histosynth prepare histosynth/data/samples/cmu_small_region.svs --out demo-data/image-dataset \
		--mpp 0.5 --patch 128 --stride 64 --auto-labels regions --label-fraction 0.5 --seed 0 --min-tissue 0.1

# `train KIND CONFIG OUT`: a fresh run, or --resume when OUT.train/ holds checkpoints of an interrupted one.
train = $(VENV)/bin/histosynth train $(1) --config configs/demo/$(2).yaml $$(test -d $(3).train && echo --resume)

demo-weights: demo-data/dataset demo-data/image-dataset
	rm -rf histosynth/weights/demo/autoencoder histosynth/weights/demo/mask histosynth/weights/demo/image
	OMP_NUM_THREADS=1 $(call train,mask,mask,histosynth/weights/demo/mask) & \
	OMP_NUM_THREADS=1 $(call train,autoencoder,autoencoder,histosynth/weights/demo/autoencoder) && \
	$(call train,image,image,histosynth/weights/demo/image) && wait
