# Entry points: `make deploy TARGET=rpi4`, `make test`. Every target that needs the venv creates it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

TARGET ?= rpi4
# MODEL and BUDGET, when not given, are the CLI's own defaults (`cnn-deploy deploy --help`): make and the CLI run
# the same model at the same budget. METHOD or RANK without BUDGET factors every layer by them; BUDGET=none too.

comma := ,
# The model's input when it does not say: INPUT_SHAPE=1x49x10 MEAN=0.5 STD=0.25 (or one value per channel,
# MEAN=0.49,0.48,0.45). EXCLUDE= (even empty) replaces the rule that keeps the stem and classifier dense.
MODEL_ARGS = $(if $(MODEL),--model $(MODEL)) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(INPUT_SHAPE),--input-shape $(INPUT_SHAPE)) \
	$(if $(MEAN),--mean $(subst $(comma), ,$(MEAN))) $(if $(STD),--std $(subst $(comma), ,$(STD))) \
	$(if $(SIGNATURE),--signature $(SIGNATURE))

# Overrides passed to the CLI only when set, so the target profile's values stand otherwise.
DEPLOY_ARGS = --target $(TARGET) $(MODEL_ARGS) \
	$(if $(filter-out undefined,$(origin EXCLUDE)),--exclude $(subst $(comma), ,$(EXCLUDE))) \
	$(if $(METHOD),--method $(METHOD)) $(if $(RANK),--rank $(RANK)) \
	$(if $(CANDIDATES),--candidates $(subst $(comma), ,$(CANDIDATES))) \
	$(if $(BUDGET),--budget $(BUDGET)) $(if $(FINETUNE_EPOCHS),--finetune-epochs $(FINETUNE_EPOCHS)) \
	$(if $(DATA),--data $(DATA)) $(if $(EVAL_SAMPLES),--eval-samples $(EVAL_SAMPLES)) $(if $(OUT),--out $(OUT)) \
	$(if $(BASELINE),--baseline $(BASELINE)) $(if $(DEVICE),--device $(DEVICE)) $(if $(TORCH_DEVICE),--torch-device $(TORCH_DEVICE)) \
	$(if $(TEACHER),--teacher $(TEACHER)) $(if $(TEACHER_WEIGHTS),--teacher-weights $(TEACHER_WEIGHTS)) \
	$(if $(filter 1 yes true,$(QUIET)),--quiet)

.PHONY: setup setup-cluster setup-board setup-tf deploy bench families mlperf-tiny regress firmware flash train setup-device third-party decompose test test-fast test-network lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

deploy: setup
	$(BIN)/cnn-deploy deploy $(DEPLOY_ARGS)

# Benchmark (not a test): BENCH_MODELS, BUDGETS (fractions of MACs), FINETUNE_EPOCHS (one, or one per model),
# TARGET (one or more profiles), TASK_THREADS (torch threads per compression job). With RAY_ADDRESS set the
# grid's compression points run as Ray tasks (make setup-cluster).
BENCH_MODELS ?= resnet20 resnet56
BUDGETS      ?= 0.75 0.5 0.35 0.25
bench: setup
	CIFAR_RESNET_DIR=$${CIFAR_RESNET_DIR:-$(CURDIR)/../shared/models/cifar-resnet} \
	$(BIN)/cnn-deploy bench --models $(BENCH_MODELS) --budgets $(BUDGETS) --target $(TARGET) \
		$(if $(FINETUNE_EPOCHS),--epochs $(FINETUNE_EPOCHS)) $(if $(DATA),--data $(DATA)) \
		$(if $(EVAL_SAMPLES),--eval-samples $(EVAL_SAMPLES)) $(if $(OUT),--out $(OUT)) \
		$(if $(TASK_THREADS),--threads $(TASK_THREADS))

# MLPerf Tiny's own files (MLPERF_TINY_DIR, default ../shared/models/mlperf-tiny): each reference int8 .tflite measured
# as it is on TARGET (default the reference board, nucleo-l4r5zi), beside ours made from the float file (dense, and
# factored at BUDGET, default 0.7; needs `make setup-tf`) and the published board figures: bench/mlperf-tiny/.
# Factorisation only, channel pruning only and both at one budget (default cycles:0.75) on each target, side by
# side: MODELS="resnet8 resnet20", TARGET="rpi4 nucleo-l4r5zi nucleo-h743zi", FINETUNE_EPOCHS (default 0).
families: setup
	$(BIN)/cnn-deploy families $(if $(MODELS),--models $(MODELS)) \
		$(if $(filter command line,$(origin TARGET)),--target $(TARGET)) \
		$(if $(filter command line,$(origin BUDGET)),--budget $(BUDGET)) \
		$(if $(FINETUNE_EPOCHS),--epochs $(FINETUNE_EPOCHS)) $(if $(DATA),--data $(DATA)) \
		$(if $(EVAL_SAMPLES),--eval-samples $(EVAL_SAMPLES)) $(if $(OUT),--out $(OUT))

mlperf-tiny: setup
	$(BIN)/cnn-deploy mlperf-tiny --target $(if $(filter command line,$(origin TARGET)),$(TARGET),nucleo-l4r5zi) \
		$(if $(filter command line,$(origin BUDGET)),--budget $(BUDGET)) $(if $(DATA),--data $(DATA)) \
		$(if $(EVAL_SAMPLES),--eval-samples $(EVAL_SAMPLES)) $(if $(OUT),--out $(OUT))

# TARGET may name several builds (TARGET="rpi4 cortex-m4"): on a Ray board farm they run at once. A microcontroller
# build on its board: DEVICE=serial:///dev/ttyACM0 (after `make flash`), SAMPLES=N images.
regress: setup
	$(BIN)/cnn-deploy regress --target $(TARGET) $(if $(DEVICE),--device $(DEVICE)) \
		$(if $(or $(SAMPLES),$(EVAL_SAMPLES)),--eval-samples $(or $(SAMPLES),$(EVAL_SAMPLES))) $(if $(DATA),--data $(DATA)) \
		$(if $(OUT),--out $(OUT)) $(if $(IMAGES),--images $(IMAGES)) $(if $(filter 1 yes true,$(ACCEPT)),--accept)

# A microcontroller build's firmware/board.hex into its board through the on-board ST-LINK (pyOCD; PROBE=ID picks
# one of several).
flash: setup-board
	$(BIN)/cnn-deploy flash --target $(TARGET) $(if $(OUT),--out $(OUT)) $(if $(PROBE),--probe $(PROBE))

# Firmware for a microcontroller build (build/<TARGET>): TFLM + CMSIS-NN linked and run on the emulated board.
firmware: setup
	$(BIN)/cnn-deploy firmware --target $(TARGET) $(if $(OUT),--out $(OUT)) $(if $(SAMPLES),--samples $(SAMPLES))

# Train a model from scratch (how the zoo's reference weights were made): MODEL, DATA, EPOCHS, OUT (the .pt,
# default <model>.pt).
EPOCHS ?= 40
train: setup
	$(BIN)/cnn-deploy train $(MODEL_ARGS) --epochs $(EPOCHS) $(if $(OUT),--out $(OUT)) $(if $(DATA),--data $(DATA)) \
		$(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) $(if $(LR),--lr $(LR)) $(if $(filter 1 yes true,$(NO_FLIP)),--no-flip) \
		$(if $(TORCH_DEVICE),--torch-device $(TORCH_DEVICE))

# The optional Ray extra: RAY_ADDRESS=auto (or a head's host:port) then spreads sweeps, grids and device checks.
setup-cluster: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,cluster]'

# TensorFlow and tf2onnx in their own environment (.venv-tf), never the main install: MODEL=model.keras, model.h5,
# saved_model_dir/ or model.tflite are converted there (pipeline/zoo/tf_convert.py). About 1.6 GB.
TF_VENV := .venv-tf
setup-tf: $(TF_VENV)/.installed-stamp

$(TF_VENV)/.installed-stamp: pipeline/zoo/tf-requirements.txt
	test -x $(TF_VENV)/bin/python || $(PYTHON) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r pipeline/zoo/tf-requirements.txt
	touch $@

# pyOCD, which `make flash` programs boards with (the optional `board` extra).
setup-board: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,board]'

setup-device: setup
	$(BIN)/cnn-deploy setup-device

# The firmware's sources (TFLM, CMSIS-NN, CMSIS, flatbuffers, gemmlowp) at the commits pinned in
# pipeline/tflm/third_party.toml, fetched with git into the cache and verified; needs github.com.
# CHECK=DIR verifies a copy you have (e.g. TFLM_SOURCES) instead.
third-party: setup
	$(BIN)/cnn-deploy third-party $(if $(CHECK),--check $(CHECK))

decompose: setup
	$(BIN)/cnn-deploy decompose --target $(TARGET) $(MODEL_ARGS) \
		$(if $(METHOD),--method $(METHOD)) $(if $(RANK),--rank $(RANK)) $(if $(OUT),--out $(OUT)) \
		$(if $(BUDGET),--budget $(BUDGET)) $(if $(FINETUNE_EPOCHS),--finetune-epochs $(FINETUNE_EPOCHS)) \
		$(if $(DATA),--data $(DATA)) $(if $(TORCH_DEVICE),--torch-device $(TORCH_DEVICE)) \
		$(if $(TEACHER),--teacher $(TEACHER)) $(if $(TEACHER_WEIGHTS),--teacher-weights $(TEACHER_WEIGHTS))

# One worker per core, each taking whole files (a file's module fixtures are built once; the SSH board test's /tmp
# check and the Ray head stay in one process); at most 4, each holding torch and a model or two in memory.
test: setup
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

test-network: setup
	$(BIN)/python -m pytest -m network

lint: setup
	$(BIN)/ruff check pipeline calib targets tests

clean:
	rm -rf build bench .pytest_cache .ruff_cache .hypothesis *.egg-info
