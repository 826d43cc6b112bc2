# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv (Python 3.11) and install the project with its extras first.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_SRC := data/digits
TINY_SAMPLE := data/tiny-imagenet-demo
DEMO_OUT := shards/demo

.PHONY: install system demo test lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dali,decode,dev,demo,export]'
	touch $@

install: $(VENV)/.installed

# The main job end to end on a real dataset that ships offline (scikit-learn's digits): write it as
# JPEG folders, pack and verify shards, train on 2 CPU processes (torchrun + gloo, DALI CPU, W&B
# offline without a key), train again with torchvision's recipe ingredients (TrivialAugment, random
# erasing, MixUp, CutMix, EMA, progressive resizing), classify the held-out test digits, re-evaluate
# the checkpoint, export it to ONNX and classify the test digits again on onnxruntime. Then pack the
# bundled Tiny ImageNet-layout sample, whose val labels only its annotation file gives.
demo: install
	$(PY) -m imagenet_ddp.demo_data --out $(DEMO_SRC)
	$(PY) make_shards.py folder --src $(DEMO_SRC) --out $(DEMO_OUT) --shard-size 100 --workers 2
	$(PY) make_shards.py verify $(DEMO_OUT)/train $(DEMO_OUT)/val --against-source
	$(VENV)/bin/torchrun --standalone --nproc_per_node=2 train_ddp.py --config configs/demo.yaml
	$(VENV)/bin/torchrun --standalone --nproc_per_node=2 train_ddp.py --config configs/demo_torchvision.yaml
	$(PY) predict.py --checkpoint runs/demo/best.pt $(DEMO_SRC)/test --topk 3 --lang es
	$(PY) predict.py --checkpoint runs/demo/best.pt --evaluate $(DEMO_OUT)/val
	$(PY) predict.py --checkpoint runs/demo/best.pt --export runs/demo/model.onnx
	$(PY) predict.py --model runs/demo/model.onnx $(DEMO_SRC)/test --topk 1 --lang es --format csv
	$(PY) make_shards.py tiny-imagenet --src $(TINY_SAMPLE) --out shards/tiny-sample --shard-size 250
	$(PY) make_shards.py verify shards/tiny-sample/train shards/tiny-sample/val

# System packages the tests use for real (SLURM + munge, Chromium + chromedriver), from the
# distribution, when we may install them.
system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		bash .ci/slurm.sh install && bash .ci/browser.sh; \
	else echo "make: not root: tests needing SLURM or Chromium are skipped unless they are installed"; fi

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint system
	$(PY) -m pytest

bench: install
	$(PY) -m imagenet_ddp.bench shards

clean:
	rm -rf $(DEMO_OUT) $(DEMO_SRC) shards/tiny-sample runs/demo runs/demo_torchvision .pytest_cache
