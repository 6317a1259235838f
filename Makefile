# droppos: `make demo` runs the main job on the built-in sample data, `make test` the tests.
# Both set up .venv first (idempotent: a stamp records the requirements it was built from).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.setup-stamp
DEMO ?= demo

.PHONY: setup demo test bench clean

setup: $(STAMP)

# The optional codecs Pillow-SIMD is built with (names as PIL.features says them), and the Debian
# packages of their headers. `make setup` installs missing headers where it can (root + apt-get),
# else names what is missing and builds without it; shard then skips such files with that reason.
CODECS := $(VENV)/.pillow-codecs
CODEC_TRIED := $(VENV)/.codec-install-tried
HAS_WEBP = printf '\#include <webp/decode.h>\n\#include <webp/encode.h>\n\#include <webp/mux.h>\n\#include <webp/demux.h>\nint main(void) { return 0; }\n' | $(CC) -x c - -o /dev/null -lwebp -lwebpmux -lwebpdemux >/dev/null 2>&1
HAS_TIFF = printf '\#include <tiff.h>\n\#include <tiffio.h>\nint main(void) { return 0; }\n' | $(CC) -x c - -o /dev/null -ltiff >/dev/null 2>&1

# The codecs whose headers and libraries the compiler finds (after installing the missing ones, once
# per missing set). Rewritten only when that set changes: the stamp, which depends on it, is then out
# of date and Pillow-SIMD is rebuilt; otherwise a second `make setup` does nothing.
$(CODECS): FORCE
	@mkdir -p $(VENV); missing=""; \
	$(HAS_WEBP) || missing="$$missing libwebp-dev"; $(HAS_TIFF) || missing="$$missing libtiff-dev"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(cat $(CODEC_TRIED) 2>/dev/null)" != "$$missing" ]; then \
	  echo "$$missing" > $(CODEC_TRIED); \
	  echo "setup: installing the codec headers Pillow-SIMD builds with:$$missing"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; } \
	    >/dev/null 2>&1 || echo "setup: apt-get could not install$$missing"; \
	fi; \
	codecs=""; $(HAS_WEBP) && codecs="webp"; $(HAS_TIFF) && codecs="$${codecs:+$$codecs }libtiff"; \
	if [ ! -f $@ ] || [ "$$(cat $@)" != "$$codecs" ]; then echo "$$codecs" > $@; fi

FORCE:

# Pillow-SIMD replaces the Pillow that torchvision and timm pull in: install everything else,
# remove Pillow, then build Pillow-SIMD (with AVX2 where the CPU has it) with --no-deps, again
# whenever the codecs it was built with differ from the ones available now (no wheel cache:
# a cached wheel keeps the codecs of the build that made it).
$(STAMP): requirements.txt pyproject.toml $(CODECS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	grep -v '^pillow-simd' requirements.txt > $(VENV)/requirements-base.txt
	$(PIP) install -q --disable-pip-version-check -r $(VENV)/requirements-base.txt
	@want=$$(grep '^pillow-simd==' requirements.txt | cut -d= -f3); \
	have=$$($(PY) -c "import importlib.metadata as m; print(m.version('pillow-simd'))" 2>/dev/null); \
	codecs=$$(cat $(CODECS)); \
	built=$$($(PY) -c "from PIL import features; print(' '.join(c for c in ('webp', 'libtiff') if features.check(c)))" 2>/dev/null); \
	if $(PY) -c "import importlib.metadata as m; m.version('pillow')" 2>/dev/null; then \
	  $(PIP) uninstall -q -y pillow; have=""; fi; \
	if [ "$$have" != "$$want" ] || [ "$$built" != "$$codecs" ]; then \
	  missing=""; case " $$codecs " in *" webp "*) ;; *) missing="WebP (libwebp-dev)";; esac; \
	  case " $$codecs " in *" libtiff "*) ;; *) missing="$${missing:+$$missing, }libtiff (libtiff-dev)";; esac; \
	  if [ -n "$$missing" ]; then echo "setup: building Pillow-SIMD without $$missing: headers not found; install them and run make setup again"; fi; \
	  flags=""; grep -qw avx2 /proc/cpuinfo && flags="-mavx2"; \
	  echo "building pillow-simd==$$want (CFLAGS=$$flags, codecs: $${codecs:-none})"; \
	  CC="cc $$flags" $(PIP) install -q --disable-pip-version-check --no-cache-dir --no-deps --force-reinstall "pillow-simd==$$want"; \
	fi
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -c "import PIL, torchvision, timm, nvidia.dali, webdataset; import importlib.metadata as m; from PIL import features; print('setup ok: PIL', PIL.__version__, '(pillow-simd', m.version('pillow-simd') + '), codecs:', ' '.join(c for c in ('webp', 'libtiff') if features.check(c)) or 'none')"
	@touch $@

demo: setup
	$(VENV)/bin/droppos shard --sample $(DEMO)/data
	$(VENV)/bin/droppos pretrain --preset cpu-demo --data $(DEMO)/data --out $(DEMO)/run
	$(VENV)/bin/droppos probe --preset cpu-demo --data $(DEMO)/data --run $(DEMO)/run --out $(DEMO)/probe-pretrained
	$(VENV)/bin/droppos probe --preset cpu-demo --data $(DEMO)/data --run $(DEMO)/run --random-init --out $(DEMO)/probe-random
	$(VENV)/bin/droppos probe --preset cpu-demo-seg --data $(DEMO)/data --run $(DEMO)/run --out $(DEMO)/seg-pretrained
	$(VENV)/bin/droppos probe --preset cpu-demo-seg --data $(DEMO)/data --run $(DEMO)/run --random-init --out $(DEMO)/seg-random
	$(VENV)/bin/droppos eval-pos $(DEMO)/run --random-baseline --data $(DEMO)/data --out $(DEMO)/eval-pos --label "DropPos demo" --label "random init"
	$(VENV)/bin/droppos export $(DEMO)/run --format timm --out $(DEMO)/timm
	@$(PY) tools/demo_summary.py $(DEMO)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_shard.py

clean:
	rm -rf $(DEMO) .pytest_cache

# GPU acceptance check: `make gpu-check` (benchmarks/gpu_check.py: the CUDA-marked tests, the step and loader
# benchmarks and a 200-step pre-training; one JSON summary in $(GPU_CHECK_OUT)/gpu_check.json). It needs no
# `make setup`: it runs from a fresh clone with the node's python3 (with torch), or with .venv's when there is one.
# Offline GPU nodes: `make wheelhouse` on a machine with network downloads into $(WHEELHOUSE) the wheels the node
# lacks (webdataset, DALI, timm, typer, rich, safetensors, matplotlib, pytest, with their dependencies; not torch)
# for the node's PYTHON_VERSION and PLATFORM; copy the folder to the node, then `make gpu-check WHEELHOUSE=DIR`
# installs from it (pip --no-index) into a virtual environment of its own, never into the node's Python.
GPU_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
GPU_CHECK_OUT ?= gpu-check-out
WHEELHOUSE ?= wheelhouse
PYTHON_VERSION ?= 3.12
PLATFORM ?= manylinux_2_28_x86_64
# The wheelhouse gpu-check installs from: one named on the command line (or in the environment), else the
# default folder when it exists (a folder without requirements.txt is reported, not ignored).
GPU_CHECK_WHEELS = $(if $(or $(filter-out file,$(origin WHEELHOUSE)),$(wildcard $(WHEELHOUSE))),--wheelhouse $(WHEELHOUSE))
.PHONY: gpu-check wheelhouse

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_WHEELS) $(GPU_CHECK_ARGS)

wheelhouse:
	$(PYTHON) tools/wheelhouse.py --dest $(WHEELHOUSE) --python-version $(PYTHON_VERSION) --platform $(PLATFORM) $(WHEELHOUSE_ARGS)
