# Two commands do all the set-up on a fresh machine:
#   make run    the proxy on 127.0.0.1:8080 (memory store, config/example.yaml, a fake upstream
#               on 127.0.0.1:9911 unless OPENAI_API_KEY is set)
#   make test   the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# tiktoken's encodings without a network: the workspace's shared cache, beside this checkout or
# beside the local repository it was cloned from (a clone in /tmp of /work/main finds /work/shared).
ORIGIN := $(patsubst file://%,%,$(shell git config --get remote.origin.url 2>/dev/null))
CACHE_CANDIDATES := $(abspath ../shared/tiktoken-cache) $(if $(ORIGIN),$(abspath $(ORIGIN)/../shared/tiktoken-cache))
SHARED_CACHE := $(firstword $(wildcard $(CACHE_CANDIDATES)))
ifneq ($(SHARED_CACHE),)
export TIKTOKEN_CACHE_DIR ?= $(SHARED_CACHE)
endif

.PHONY: run test lint install

$(BIN)/meterproxy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/meterproxy

run: install
	@if [ -z "$$OPENAI_API_KEY" ]; then \
	  echo "No OPENAI_API_KEY: starting the fake provider on 127.0.0.1:9911 for the demo"; \
	  $(BIN)/python tests/fakeprovider.py --port 9911 & \
	  trap "kill $$!" EXIT; \
	fi; \
	$(BIN)/meterproxy serve --config config/example.yaml

lint: install
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy proxy

test: install lint
	$(BIN)/pytest -q
