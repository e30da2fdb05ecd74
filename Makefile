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
# Nothing to do when both are on PATH; installing them needs root.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ]; then \
		echo "the browser tests need Debian's chromium and chromium-driver; install them with: sudo apt-get install -y chromium chromium-driver" >&2; \
		exit 1; \
	fi; \
	echo "installing Debian chromium + chromium-driver"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver

# The main job: capture the embedded model into runs/embedded.h5 (about 40 s on 2 idle CPU
# cores; reused when complete, resumed when interrupted), then serve the dashboard on
# http://$(HOST):$(PORT) over ./runs and the sample capture shipped in dfsviz/data/captures/.
# Another port or interface: `make run PORT=8060` (HOST=0.0.0.0 exposes it to the network);
# set on make's command line only, so a HOST or PORT in the environment changes nothing.
RUN_CAPTURE := runs/embedded.h5
HOST := 127.0.0.1
PORT := 8050

run: $(STAMP)
	@mkdir -p $(dir $(RUN_CAPTURE))
	@if $(BIN)/python -c "import sys, dfsviz; sys.exit(0 if dfsviz.open('$(RUN_CAPTURE)').complete else 1)" 2>/dev/null; then \
		echo "$(RUN_CAPTURE) is complete: reusing it (delete it to capture afresh)"; \
	elif [ -f $(RUN_CAPTURE) ]; then \
		$(BIN)/dfsviz capture --out $(RUN_CAPTURE) --resume; \
	else \
		$(BIN)/dfsviz capture --out $(RUN_CAPTURE); \
	fi
	$(BIN)/dfsviz app --host $(HOST) --port $(PORT)

# pytest's exit code 5 means no test was collected: that is a failure, not a pass.
test: $(STAMP) browser
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q --headless --webdriver Chrome $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
