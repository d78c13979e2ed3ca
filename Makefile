# Two entry points, both idempotent: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
# The local asset mirror beside the checkout, unless the caller names one.
ifneq ($(wildcard ../shared/models),)
export SAEALIGN_ASSETS ?= $(abspath ../shared)
endif
# Everything is offline: never wait on the Hugging Face hub from make.
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
TORCH := torch==2.13.0

.PHONY: demo test install install-dev export-check clean-check classifier nbtest pytest bench saes browser-deps grid llamacpp

$(BIN)/python:
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel first: an unpinned torch would pull gigabytes of CUDA packages
	$(BIN)/pip install -q $(TORCH)

# Reinstall only when the package metadata changes.
$(VENV)/.installed: $(BIN)/python settings.ini setup.py
	$(BIN)/pip install -q -e .
	touch $@

# the tests run the Ray engine too, so the dev install includes the ray extra
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev,ray]" $(TORCH)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/saealign demo

# nbdev_export and nbdev_clean must leave the tree as it is: the notebooks are the source.
export-check: install-dev
	@before=$$(find saealign -name '*.py' | sort | xargs md5sum); \
	$(BIN)/nbdev_export; \
	after=$$(find saealign -name '*.py' | sort | xargs md5sum); \
	if [ "$$before" != "$$after" ]; then echo "nbdev_export changed saealign/: export the notebooks and commit both"; diff <(echo "$$before") <(echo "$$after"); exit 1; fi

clean-check: install-dev
	@before=$$(find nbs -name '*.ipynb' | sort | xargs md5sum); \
	$(BIN)/nbdev_clean; \
	after=$$(find nbs -name '*.ipynb' | sort | xargs md5sum); \
	if [ "$$before" != "$$after" ]; then echo "nbdev_clean changed nbs/: run nbdev_clean and commit"; diff <(echo "$$before") <(echo "$$after"); exit 1; fi

# The default steer calibrates its strength with the CoLA classifier: train it once (minutes on two cores; cached)
# before the notebooks and tests, which run in parallel, would each start training it.
classifier: install-dev
	$(BIN)/python -c "from saealign.acceptability import load_acceptability; load_acceptability()"

nbtest: install-dev classifier
	$(BIN)/nbdev_test --n_workers 2

pytest: install-dev classifier browser-deps
	$(BIN)/python -m pytest -q tests

# llama.cpp's Python bindings (the llamacpp extra, for exported steers), compiled for this CPU: the library alone,
# without llama.cpp's programs, tests and examples (221 s on two cores, where the whole build took over an hour).
# Optional: the tests that need it skip, saying how to install it.
LLAMACPP_CMAKE := -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF
llamacpp: install-dev
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q -e ".[llamacpp]"

# The real-browser tests need Debian's chromium and playwright-core (pinned in tests/browser); they skip,
# saying why, when either is missing. Installing them is best effort and never fails the build.
CHROMIUM := $(shell command -v chromium || command -v chromium-browser)
browser-deps: tests/browser/node_modules/.installed
ifeq ($(CHROMIUM),)
	-@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null 2>&1 \
		|| echo "browser-deps: could not install chromium; the browser tests will skip"; \
	else echo "browser-deps: no chromium (install Debian's chromium as root); the browser tests will skip"; fi
endif

tests/browser/node_modules/.installed: tests/browser/package.json tests/browser/package-lock.json
	-@if command -v npm >/dev/null; then \
		npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error && touch $@ \
		|| echo "browser-deps: npm ci failed; the browser tests will skip"; \
	else echo "browser-deps: no npm; the browser tests will skip"; fi

test: export-check clean-check classifier nbtest pytest

# The grid chapter's full grid (about half an hour on 2 cores); run it again to resume after an interruption.
grid: install
	$(BIN)/saealign grid

bench: install-dev
	$(BIN)/python bench/run_all.py

# Reproduce the SAEs shipped in saealign/saes/ with sae_lens's trainer (Gemma: about 45 min on 2 cores, resumable; stories260K: minutes).
saes: install
	$(BIN)/saealign train-saes --model gemma-3-270m
	$(BIN)/saealign train-saes --model stories260K
