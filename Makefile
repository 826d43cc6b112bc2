# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv (Python 3.11) and install the project with its extras first.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_SRC := data/tiny-imagenet-demo
DEMO_OUT := shards/demo

.PHONY: install demo test lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dali,dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) make_shards.py tiny-imagenet --src $(DEMO_SRC) --out $(DEMO_OUT) --shard-size 100 --workers 2
	$(PY) make_shards.py verify $(DEMO_OUT)/train $(DEMO_OUT)/val

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

bench: install
	$(PY) -m imagenet_ddp.bench shards

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
