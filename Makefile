# Entry points: `make deploy TARGET=rpi4`, `make test`. Every target that needs the venv creates it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

TARGET ?= rpi4
MODEL  ?= seednet

# Overrides passed to the CLI only when set, so the target profile's values stand otherwise.
DEPLOY_ARGS = --target $(TARGET) --model $(MODEL) \
	$(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(METHOD),--method $(METHOD)) $(if $(RANK),--rank $(RANK)) \
	$(if $(DATA),--data $(DATA)) $(if $(EVAL_SAMPLES),--eval-samples $(EVAL_SAMPLES)) $(if $(OUT),--out $(OUT))

.PHONY: setup deploy regress setup-device decompose test test-fast test-network lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

deploy: setup
	$(BIN)/cnn-deploy deploy $(DEPLOY_ARGS)

regress: setup
	$(BIN)/cnn-deploy regress --target $(TARGET) $(if $(DEVICE),--device $(DEVICE)) \
		$(if $(EVAL_SAMPLES),--eval-samples $(EVAL_SAMPLES)) $(if $(DATA),--data $(DATA)) $(if $(OUT),--out $(OUT)) \
		$(if $(filter 1 yes true,$(ACCEPT)),--accept)

setup-device: setup
	$(BIN)/cnn-deploy setup-device

decompose: setup
	$(BIN)/cnn-deploy decompose --model $(MODEL) $(if $(WEIGHTS),--weights $(WEIGHTS)) \
		$(if $(METHOD),--method $(METHOD)) $(if $(RANK),--rank $(RANK)) $(if $(OUT),--out $(OUT))

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

test-network: setup
	$(BIN)/python -m pytest -m network

lint: setup
	$(BIN)/ruff check pipeline calib tests

clean:
	rm -rf build bench .pytest_cache .ruff_cache .hypothesis *.egg-info
