# Two entry points, each doing its own set-up on a fresh Debian 12 machine (as root):
#   make demo   run the main job on embedded defaults (VENUE=bybit|okx make demo: that dialect)
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
VENUE  ?= binanceusdm

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed
	@command -v redis-server >/dev/null 2>&1 || test -x /usr/bin/redis-server || { \
	  echo "installing redis-server (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(PY) -m eexit.cli demo --venue $(VENUE)

test: setup
	$(PY) -m tests

bench: setup
	bench/run

clean:
	rm -rf $(VENV) build *.egg-info
