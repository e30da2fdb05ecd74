# The two commands of the README: `make run` (the main job) and `make test` (the whole suite).
# Both create .venv on first use, install what they need, and are safe to run again.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install browser clean

$(STAMP): pyproject.toml ci-constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c ci-constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian Chromium and ChromeDriver for the browser tests and PNG export; never a downloaded browser.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing Debian chromium + chromium-driver"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	fi

run: $(STAMP)
	$(BIN)/dfsviz orders --grid 21x45x80 --block 128
	$(BIN)/dfsviz recall --grid 13x24x40

# pytest's exit code 5 means no test was collected: that is a failure, not a pass.
test: $(STAMP) browser
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q --headless --webdriver Chrome $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
