# Two commands set up everything on a fresh Debian machine:
#   make run    roller with a demo fleet on http://127.0.0.1:8000
#   make test   the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Debian packages roller uses at run time, and the real peers its tests drive.
RUN_PACKAGES := python3-venv iputils-ping ipmitool
TEST_PACKAGES := $(RUN_PACKAGES) openssh-server openssh-client openipmi snmpd snmp chromium postgresql
# axe-core (npm) checks every dashboard page's accessibility in the browser tests.
AXE_VERSION := 4.14.1
AXE := $(VENV)/axe/node_modules/axe-core/axe.min.js
SOURCES := $(shell find roller twisted templates static -type f -not -name '*.pyc') setup.py roller.tac

.PHONY: run test lint dev system-deps venv clean

run: APT_PACKAGES = $(RUN_PACKAGES)
run: system-deps venv
	$(VENV)/bin/twistd -n --pidfile= --logger roller.logs.observer roller --demo $(ARGS)

test: APT_PACKAGES = $(TEST_PACKAGES)
test: system-deps venv lint $(AXE)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The static gates (configured in pyproject.toml): roller/ stays at zero findings.
lint: venv
	$(VENV)/bin/ruff check roller
	$(VENV)/bin/mypy

venv: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES) constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt '.[test]'
	@touch $@

# A contributor's checkout: roller installed editable into $(VENV), so `$(VENV)/bin/twistd roller` runs this
# source tree.  Compat mode puts the checkout on sys.path (a .pth), which Twisted's plugin scan needs to find
# twisted/plugins/roller_plugin.py; the default editable mode does not, and twistd would not know roller.
dev: APT_PACKAGES = $(TEST_PACKAGES)
dev: system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]' \
		--config-settings editable_mode=compat
	@cd / && $(abspath $(VENV))/bin/twistd roller --help | grep -q -- '--demo' \
		|| { echo "twistd does not find the roller plugin" >&2; exit 1; }
	@touch $(VENV)/.installed
	@$(MAKE) --no-print-directory $(AXE)
	@echo "editable install in $(VENV): $(VENV)/bin/twistd -n roller --demo runs this checkout"

$(AXE):
	@command -v npm >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q nodejs npm; }
	npm install -q --prefix $(VENV)/axe --no-audit --no-fund axe-core@$(AXE_VERSION)
	@test -f $@

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
