# Two entry points: `make run` (the main job) and `make test`. Both build .venv first.
PY := .venv/bin/python
VENV := .venv/.installed

$(VENV): requirements.lock pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.lock
	.venv/bin/pip install -q --no-deps -e .
	touch $@

.PHONY: run test bench
run: $(VENV)
	.venv/bin/privoffload reproduce --profile auto --out runs/main

test: $(VENV)
	$(PY) -m pytest -q

bench: $(VENV)
	$(PY) bench/run_all.py
