# Two commands for a fresh machine: `make demo` and `make test`. Each does the whole set-up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PDMP   := $(VENV)/bin/pdmp
# A torch that the base Python already has (say a CUDA build on a GPU box) is kept: the venv then sees
# the system site-packages. Otherwise torch 2.13.0 is installed into the venv.
HAVE_TORCH := $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo yes)

.PHONY: setup demo test bench clean-runs espeak

setup: $(VENV)/.installed espeak

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(if $(HAVE_TORCH),--system-site-packages) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# av-digits speaks its digits with espeak-ng (a Debian package, not a pip one).
espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "espeak-ng is missing: installing it with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng >/dev/null; } || { \
	    echo "error: could not install espeak-ng; install it yourself (Debian/Ubuntu: sudo apt-get install espeak-ng) and re-run"; exit 1; }; }

# rank → compare (joint, OGM-GE, PDMP; concat; 3 seeds) → report, on the built-in av-digits dataset.
demo: setup
	$(PDMP) rank --dataset av-digits --seeds 3
	$(PDMP) compare --dataset av-digits --methods joint,ogm-ge,pdmp --fusions concat --seeds 0,1,2
	$(PDMP) report --dataset av-digits

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PDMP) bench --json runs/bench.json

clean-runs:
	rm -rf runs
