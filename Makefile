# Two commands on a fresh Debian machine with Python 3.11:
#   make run   - set up and run the server on embedded defaults with the bundled models
#   make test  - set up and run the whole test suite (and the type, lint and architecture checks)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run demo test check

$(BIN)/radai: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# constraints.txt pins torch to the CPU build available locally; CUDA machines may drop it.
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# The `torch` runtime backend converts ONNX packages with onnx2torch. Its declared torchvision dependency
	# (only for two detection ops radai refuses anyway) resolves to a CUDA build that cannot load beside the
	# CPU torch, so it is installed without dependencies here; GPU machines use `pip install '.[torch]'`.
	$(BIN)/pip install -q --no-deps 'onnx2torch==1.5.15'
	touch $(BIN)/radai

setup: $(BIN)/radai

run: setup
	$(BIN)/radai serve

demo: setup
	$(BIN)/radai demo

check: setup
	$(BIN)/ruff check radai dicom_router model_zoo tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

test: setup
	bash scripts/system-packages.sh
	bash scripts/viewer-deps.sh
	$(MAKE) check
	$(BIN)/python -m pytest -q
