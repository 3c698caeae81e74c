# Two commands do all the set-up on a fresh machine (Python >= 3.10, 3.11 recommended):
#   make demo   -- creates/refreshes .venv, then runs the main job on data that ships
#   make test   -- creates/refreshes .venv, then lint + the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint format bench-cpu clean container-tools

# tests/docker/test_container.py builds docker/Dockerfile's CPU variant and runs it; it needs root and Debian's
# buildah, podman, runc and debootstrap. Run as root (CI), `make test` installs them when missing and makes that
# test mandatory; otherwise it skips and says why.
CONTAINER_TOOLS := buildah podman runc debootstrap

# The venv is rebuilt when pyproject.toml changes (the stamp is older than it).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# --overwrite replaces only the folders an earlier `make demo` wrote in medmamba-demo/
demo: $(STAMP)
	$(BIN)/medmamba demo -o medmamba-demo --overwrite

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

container-tools:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  for tool in $(CONTAINER_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing $(CONTAINER_TOOLS) for tests/docker (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CONTAINER_TOOLS) >/dev/null; \
	  fi; \
	fi

# -n auto --dist loadfile: one worker per core, each test file whole in one worker (its module fixtures built once);
# --no-loadscope-reorder: the files in tests/conftest.py's order, longest first (xdist would sort them by their
# number of tests and leave the long files with few tests for last)
test: lint container-tools
	MEDMAMBA_REQUIRE_CONTAINER=$$([ "$$(id -u)" = 0 ] && echo 1) $(BIN)/python -m pytest -n auto --dist loadfile \
	  --no-loadscope-reorder

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/scan_cpu.py

clean:
	rm -rf $(VENV) build dist *.egg-info
