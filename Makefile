# The two set-up commands: `make demo` and `make test`. Both create .venv when it is
# missing and install the pinned dependencies (pyproject.toml + constraints.txt);
# re-running is instant while those files are unchanged.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flm-installed

.PHONY: demo test test-fast lint bench quality clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flm-dist demo --config jobs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check flm_dist tests bench

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

quality: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[quality]'
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
