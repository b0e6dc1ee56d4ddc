# Two commands for a fresh machine: `make demo` and `make test`. Each does the whole set-up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PDMP   := $(VENV)/bin/pdmp
# apt-get as root, or through sudo; prints what to install by hand when neither works.
APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	{ $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq

.PHONY: setup venv espeak demo test bench clean-runs

setup: $(VENV)/.installed espeak

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PY) -m pip --version >/dev/null 2>&1 || $(MAKE) --no-print-directory venv
	@# torch 2.13.0 only when none is importable, so a CUDA torch seen by the venv is kept.
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# A torch that the base Python already has (a CUDA build on a GPU box, say) stays visible to the venv.
venv:
	@rm -rf $(VENV)
	@flags=; $(PYTHON) -c "import torch" >/dev/null 2>&1 && flags=--system-site-packages; \
	$(PYTHON) -m venv $$flags $(VENV) >/dev/null 2>&1 || { \
	  echo "$(PYTHON) cannot create a venv: installing python3-venv with apt-get"; rm -rf $(VENV); \
	  $(APT_INSTALL) python3-venv >/dev/null; } || { \
	    echo "error: install the venv module yourself (Debian/Ubuntu: sudo apt-get install python3-venv) and re-run"; exit 1; }; \
	  $(PYTHON) -m venv $$flags $(VENV); }

# av-digits speaks its digits with espeak-ng (a Debian package, not a pip one).
espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "espeak-ng is missing: installing it with apt-get"; \
	  $(APT_INSTALL) espeak-ng >/dev/null; } || { \
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
