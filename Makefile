# Two entry points: `make run` (the main job) and `make test`. Both build .venv first; `make test` also puts
# in place what the browser test needs: the page's runtime (`make web`) and headless Chromium (`make browser`).
PY := .venv/bin/python
VENV := .venv/.installed
ORT := src/privoffload/cloud/static/ort
WEB := $(ORT)/.installed

$(VENV): requirements.lock pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.lock
	.venv/bin/pip install -q --no-deps -e .
	touch $@

.PHONY: run test bench web browser edge
run: $(VENV)
	.venv/bin/privoffload reproduce --profile auto --out runs/main

test: $(VENV) $(WEB) browser
	$(PY) -m pytest -q

bench: $(VENV)
	$(PY) bench/run_all.py

# The browser client's runtime: ONNX Runtime Web (WebAssembly) at the version web/package-lock.json pins, from
# npm, copied into the package (git-ignored: the .wasm is 14 MB). The page loads nothing from elsewhere.
web: $(WEB)
$(WEB): web/package.json web/package-lock.json
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q --no-install-recommends npm >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends npm >/dev/null; }; }; } || true
	@command -v npm >/dev/null || { echo "npm is missing: install Node.js (apt-get install -y npm) for the browser client"; exit 1; }
	npm ci --prefix web --ignore-scripts --no-audit --no-fund --loglevel=error || \
	  { sleep 5; npm ci --prefix web --ignore-scripts --no-audit --no-fund --loglevel=error; }
	mkdir -p $(ORT)
	cp web/node_modules/onnxruntime-web/dist/ort.wasm.bundle.min.mjs \
	   web/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm $(ORT)/
	touch $@

# Headless Chromium for the browser test, from Debian when it is missing and we are root (the package index is
# refreshed only if the install fails without it); elsewhere the test is skipped and says why.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null; } || \
	    echo "could not install chromium: the browser test will be skipped"; \
	  else echo "chromium is not installed and this is not root: the browser test will be skipped"; fi; }

# The optional exporters (export --format executorch|tflite), kept to the versions requirements.lock pins.
edge: $(VENV)
	.venv/bin/pip install -q -c requirements.lock -e '.[edge]'
	.venv/bin/pip install -q --no-deps litert-torch==0.10.0 litert-converter==0.5.0
